"""The shared training loop: loss on target tokens only, prompts cut in the middle, clear errors."""

import pytest
import torch

from mta.config import TrainConfig
from mta.io import MTAError
from mta.tasks import Example
from mta.training import encode, fit, prompt_ids, train


@pytest.mark.parametrize("n, max_length, want", [
    (10, 20, list(range(10))),  # fits: untouched
    (100, 60, list(range(24)) + list(range(64, 100))),  # the template's head of 24 + the question at the end
    (100, 30, list(range(15)) + list(range(85, 100))),  # too short for a head of 24: half and half
    (100, 10, list(range(5)) + list(range(95, 100))),  # max_length under the head: still both ends, never longer
    (100, 1, [99]),
])
def test_fit(n, max_length, want):
    assert fit(list(range(n)), max_length) == want


def test_encode_masks_the_prompt(tiny):
    _, tok = tiny
    ids, labels = encode(tok, Example("Which tag?", "comedy"), 384)
    prompt = prompt_ids(tok, "Which tag?")
    target = tok("comedy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt + target
    assert labels == [-100] * len(prompt) + target
    assert tok.decode(prompt).startswith("<|im_start|>user\nWhich tag?<|im_end|>\n<|im_start|>assistant\n")


def test_encode_respects_max_length(tiny):
    _, tok = tiny
    ex = Example(" ".join(["comedy romance"] * 200), " ".join(["action"] * 100))
    target = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for max_length in (16, 64, 128, 1024):
        ids, labels = encode(tok, ex, max_length)
        assert len(ids) == len(labels) <= max_length
        kept = [x for x in labels if x != -100]
        assert kept == target[: max_length // 2]  # the target keeps at most half the budget, from its start
        assert ids[-len(kept):] == kept


def test_train_lowers_the_loss_of_what_requires_grad(tiny):
    model, tok = tiny
    for p in model.parameters():
        p.requires_grad = False
    head = model.model.norm.weight
    head.requires_grad = True
    before = {n: p.clone() for n, p in model.named_parameters()}
    stats = train(model, tok, [Example("Which tag?", "comedy")] * 4, TrainConfig(epochs=8, batch_size=4, learning_rate=0.05), progress=False)
    assert stats["steps"] == 8 and len(stats["losses"]) == 8 and stats["tokens"] > 0
    assert stats["losses"][-1] < stats["losses"][0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"model.norm.weight"}
    assert not model.training


def test_train_errors(tiny):
    model, tok = tiny
    with pytest.raises(MTAError, match="user 7: no training examples"):
        train(model, tok, [], TrainConfig(), desc="user 7")
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(MTAError, match="nothing to train"):
        train(model, tok, [Example("a", "b")], TrainConfig())


def _batch(tok, n=3):
    from mta.training import _collate, encode

    exs = [Example(f"Which tag fits movie {i}? " + "a silly prank war " * i, ["comedy", "sci-fi", "dark comedy"][i % 3]) for i in range(n)]
    return _collate([encode(tok, ex, 128) for ex in exs], tok.pad_token_id, torch.device("cpu"))


@pytest.mark.parametrize("plain", [False, True])
def test_target_only_loss_equals_the_full_logits_loss(tiny, plain):
    """Projecting only the target positions onto the vocabulary changes neither the loss nor its gradient."""
    from mta.training import _Step

    model, tok = tiny
    batch = _batch(tok)
    params = list(model.parameters())
    want = model(**batch).loss
    want_grads = torch.autograd.grad(want, params)
    step = _Step(model, params, plain)
    assert step.slice_logits != plain  # plain: all logits, as for models without `logits_to_keep`
    got = step(batch, [0, 1, 2])
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, params), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def _three_layer_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def _train_stack(model, tok, plain: bool):
    from mta.config import StackConfig
    from mta.stacking import with_adapters

    torch.manual_seed(0)
    model = with_adapters(model, None, StackConfig(rank=2, top_layers=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    exs = [Example(f"Which tag fits movie {i}? " + "a prank war " * (i % 4), ["comedy", "sci-fi"][i % 2]) for i in range(6)]
    cfg = TrainConfig(epochs=3, batch_size=4, learning_rate=1e-2, mixed_precision="no")  # equal to fp32 rounding
    stats = train(model, tok, exs, cfg, progress=False, plain=plain)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return stats, weights


def test_frozen_bottom_layers_run_once_and_change_nothing(tiny_model_dir):
    """A stack on the top 2 of 3 layers: layer 0's output is cached after the first pass, the result is the same."""
    from mta.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    slow, want = _train_stack(_three_layer_llama(tok), tok, plain=True)
    fast, got = _train_stack(_three_layer_llama(tok), tok, plain=False)
    assert slow["cached_steps"] == 0 and slow["cached_from_layer"] == 0
    assert fast["cached_from_layer"] == 1 and fast["cached_steps"] >= fast["steps"] - 2  # all but the first pass
    assert want.keys() == got.keys() and any(".layers.2." in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(fast["losses"]), torch.tensor(slow["losses"]), rtol=1e-4, atol=1e-5)


def test_no_cache_when_a_bottom_parameter_trains(tiny):
    model, tok = tiny
    for n, p in model.named_parameters():
        p.requires_grad = ".layers.1." in n or n == "model.embed_tokens.weight"
    stats = train(model, tok, [Example("Which tag?", "comedy")] * 4, TrainConfig(epochs=2, batch_size=4), progress=False)
    assert stats["cached_steps"] == 0 and stats["cached_from_layer"] == 0


def test_architecture_that_cannot_be_entered_midway_falls_back(tiny_model_dir, monkeypatch):
    """GPT-2 adds position embeddings to its input embeddings: entering at a layer is not exact, so every step runs all layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from mta.models import load_tokenizer
    from mta.training import _Step

    monkeypatch.setattr(_Step, "_exact", {})
    tok = load_tokenizer(str(tiny_model_dir))
    results = []
    for plain in (True, False):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                           resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
        pm = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], layers_to_transform=[1], fan_in_fan_out=True))
        exs = [Example(f"Which tag fits movie {i}?", "comedy") for i in range(4)]
        if not plain:
            with pytest.warns(UserWarning, match="cannot be entered at a decoder layer"):
                stats = train(pm, tok, exs, TrainConfig(epochs=3, batch_size=2, learning_rate=1e-2), progress=False)
        else:
            stats = train(pm, tok, exs, TrainConfig(epochs=3, batch_size=2, learning_rate=1e-2), progress=False, plain=True)
        results.append(stats)
    assert results[1]["cached_steps"] == 0 and results[1]["cached_from_layer"] == 0
    torch.testing.assert_close(torch.tensor(results[1]["losses"]), torch.tensor(results[0]["losses"]))


def test_mixed_precision_context(monkeypatch):
    from mta import models
    from mta.models import mixed_precision

    cpu = torch.device("cpu")

    def autocast_on(ctx) -> bool:
        with ctx:
            return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16

    assert autocast_on(mixed_precision(cpu, torch.float32, "bf16"))
    assert not autocast_on(mixed_precision(cpu, torch.float32, "no"))
    assert not autocast_on(mixed_precision(cpu, torch.bfloat16, "bf16"))  # weights already low precision: run as stored
    for fast in (True, False):
        monkeypatch.setattr(models, "fast_bf16", lambda device, fast=fast: fast)
        assert autocast_on(mixed_precision(cpu, torch.float32, "auto")) is fast
    with pytest.raises(MTAError, match="unknown mixed precision 'fp8'"):
        mixed_precision(cpu, torch.float32, "fp8")


def test_bf16_training_keeps_fp32_weights_and_tracks_fp32(tiny_model_dir):
    """bf16 matmuls, fp32 weights and optimizer: the same run in fp32 and in bf16 ends close, and learns."""
    from mta.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    runs = {}
    for mode in ("no", "bf16"):
        from mta.config import StackConfig
        from mta.stacking import with_adapters

        torch.manual_seed(0)
        model = with_adapters(_three_layer_llama(tok), None, StackConfig(rank=2, top_layers=None))
        exs = [Example(f"Which tag fits movie {i}?", ["comedy", "sci-fi"][i % 2]) for i in range(6)]
        stats = train(model, tok, exs, TrainConfig(epochs=4, batch_size=3, learning_rate=3e-2, mixed_precision=mode), progress=False)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        runs[mode] = stats["losses"]
    assert runs["bf16"] != runs["no"]  # bf16 really ran
    assert runs["bf16"][-1] < runs["bf16"][0]
    torch.testing.assert_close(torch.tensor(runs["bf16"]), torch.tensor(runs["no"]), rtol=0.05, atol=0.05)


def test_a_loss_that_is_not_finite_stops_training(tiny):
    model, tok = tiny
    for p in model.parameters():
        p.requires_grad = False
    model.model.norm.weight.requires_grad = True
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # as weights that diverged at too high a learning rate
    with pytest.raises(MTAError, match=r"anchor x: the training loss is nan at step 1 of 2; lower the learning rate"):
        train(model, tok, [Example("Which tag?", "comedy")] * 4, TrainConfig(epochs=2, batch_size=4), desc="anchor x", progress=False)
