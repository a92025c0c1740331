"""LoraWeights: one ΔW = B·A convention (scaling folded into B) and a faithful bridge to PEFT."""

import json

import pytest
import torch
from conftest import logits, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from mta.adapters import LoraWeights, attach, check_fits, extract, folded, fresh_adapter
from mta.io import MTAError
from mta.models import load_base


def _random_peft_adapter(model, folder, seed=0, **config):
    """Save a PEFT adapter with random (non-zero) A and B under `folder`."""
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", **config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.save_pretrained(folder)
    return pm.unload()


def _random_weights(model, rank, seed=0, modules=("q_proj", "v_proj", "down_proj")) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in modules:
            out[name] = (torch.randn(rank, m.in_features, generator=gen) * 0.2, torch.randn(m.out_features, rank, generator=gen) * 0.2)
    return LoraWeights(out)


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=4),
        dict(r=4, lora_alpha=16),  # scaling 4 folded into B
        dict(r=4, lora_alpha=8, use_rslora=True),  # scaling alpha/sqrt(r)
        dict(r=4, lora_alpha=4, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 12}),
        # PEFT matches pattern keys as regex suffixes of the module path, not only as full or short names
        dict(r=4, lora_alpha=4, rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.\w+_proj": 12}),
    ],
    ids=["alpha=r", "alpha=4r", "rslora", "rank+alpha-pattern", "regex-patterns"],
)
def test_from_peft_dir_matches_peft_logits(tiny_model_dir, tmp_path, input_ids, config):
    model, _ = load_base(str(tiny_model_dir), device="cpu")
    base = _random_peft_adapter(model, tmp_path / "adapter", **config)
    want = logits(PeftModel.from_pretrained(base, tmp_path / "adapter"), input_ids)

    weights = LoraWeights.from_peft_dir(tmp_path / "adapter")
    fresh, _ = load_base(str(tiny_model_dir), device="cpu")
    got = logits(attach(fresh, weights, "mine"), input_ids)
    plain = logits(load_base(str(tiny_model_dir), device="cpu")[0], input_ids)

    assert not torch.allclose(want, plain, atol=1e-3), "the adapter must actually change the logits"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_scaling_is_folded_into_b(tiny_model_dir, tmp_path):
    model, _ = load_base(str(tiny_model_dir), device="cpu")
    _random_peft_adapter(model, tmp_path / "a", r=4, lora_alpha=12)
    raw = load_file(tmp_path / "a" / "adapter_model.safetensors")
    weights = LoraWeights.from_peft_dir(tmp_path / "a")
    name = "model.layers.0.self_attn.q_proj"
    a, b = weights.modules[name]
    assert torch.equal(a, raw[f"base_model.model.{name}.lora_A.weight"])
    torch.testing.assert_close(b, raw[f"base_model.model.{name}.lora_B.weight"] * 3.0)
    assert weights.rank == 4


def test_save_peft_dir_round_trip_is_a_standard_adapter(tiny_model_dir, tmp_path, input_ids):
    model, _ = load_base(str(tiny_model_dir), device="cpu")
    w = _random_weights(model, rank=3)
    w.save_peft_dir(tmp_path / "adapter", base_model="tiny")

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (3, 3, "tiny")
    back = LoraWeights.from_peft_dir(tmp_path / "adapter")
    assert back.modules.keys() == w.modules.keys()
    for n in w.modules:
        assert torch.equal(back.modules[n][0], w.modules[n][0]) and torch.equal(back.modules[n][1], w.modules[n][1])

    want = logits(PeftModel.from_pretrained(model, tmp_path / "adapter"), input_ids)
    fresh, _ = load_base(str(tiny_model_dir), device="cpu")
    torch.testing.assert_close(logits(attach(fresh, w, "x"), input_ids), want, atol=1e-5, rtol=1e-5)


def test_padded_and_concat_keep_delta(tiny):
    model, _ = tiny
    w1, w2 = _random_weights(model, 2, seed=1), _random_weights(model, 3, seed=2, modules=("q_proj",))
    padded = w1.padded(5)
    for n in w1.modules:
        assert padded.modules[n][0].shape[0] == 5
        torch.testing.assert_close(padded.delta(n), w1.delta(n))
    both = LoraWeights.concat([w1, w2])
    assert both.modules.keys() == w1.modules.keys()
    for n in w1.modules:
        want = w1.delta(n) + (w2.delta(n) if n in w2.modules else 0)
        torch.testing.assert_close(both.delta(n), want, atol=1e-6, rtol=1e-5)


def test_mixed_ranks_attach_at_the_largest_rank(tiny, input_ids):
    """Modules of different rank (svd output, rank_pattern) share one PEFT config by zero padding."""
    model, _ = tiny
    w = LoraWeights.concat([_random_weights(model, 2, modules=("q_proj",)), _random_weights(model, 5, seed=3, modules=("up_proj",))])
    pm = attach(model, w, "mixed")
    back = extract(pm, "mixed")
    for n in w.modules:
        torch.testing.assert_close(back.delta(n), w.delta(n))


def test_extract_returns_what_was_attached(tiny):
    model, _ = tiny
    w, other = _random_weights(model, 4), _random_weights(model, 2, seed=9)
    pm = attach(model, w, "x")
    pm = attach(pm, other, "y")  # a second adapter must not leak into the first
    back = extract(pm, "x")
    assert back.modules.keys() == w.modules.keys()
    for n in w.modules:
        assert torch.equal(back.modules[n][0], w.modules[n][0]) and torch.equal(back.modules[n][1], w.modules[n][1])
    with pytest.raises(MTAError, match="no adapter named 'nope'"):
        extract(pm, "nope")


def test_attach_replaces_an_adapter_of_the_same_name(tiny):
    model, _ = tiny
    w1, w2 = _random_weights(model, 4, seed=1), _random_weights(model, 2, seed=2)
    pm = attach(attach(model, w1, "x"), w2, "x")
    back = extract(pm, "x")
    for n in w2.modules:
        torch.testing.assert_close(back.delta(n), w2.delta(n))


def test_attach_of_the_same_shape_fills_the_layers_in_place(tiny, tiny_model_dir, input_ids):
    """The slot that spares MTA PEFT's injection per user: the same layer objects, the new weights, bit for bit what
    a fresh attach gives."""
    model, _ = tiny
    w1, w2 = _random_weights(model, 4, seed=1), _random_weights(model, 4, seed=2)
    pm = attach(model, w1, "x")
    layers = {n: m for n, m in pm.named_modules() if n.endswith("lora_A.x")}
    pm = attach(pm, w2, "x")
    assert all(m is layers[n] for n, m in pm.named_modules() if n.endswith("lora_A.x"))
    fresh = attach(load_base(str(tiny_model_dir), device="cpu")[0], w2, "x")
    torch.testing.assert_close(logits(pm, input_ids), logits(fresh, input_ids), atol=0, rtol=0)


def test_fresh_adapter_is_the_same_on_a_model_that_had_adapters(tiny_model_dir):
    """The stack's slot: initialized again in place, or added beside other adapters, it holds what a fresh model's
    would, whatever the random state before; it is active and the only thing trainable."""
    config = LoraConfig(r=2, layers_to_transform=[1])  # PEFT's default modules, as the stack's
    models = [load_base(str(tiny_model_dir), device="cpu")[0] for _ in range(3)]
    beside = attach(models[1], _random_weights(models[1], 4), "other")  # added next to another adapter
    reused = fresh_adapter(models[2], config, "default", seed=1)  # a slot of the same config
    slot = {n: m for n, m in reused.named_modules() if n.endswith("lora_A.default")}
    states = []
    for i, model in enumerate((models[0], beside, reused)):
        torch.manual_seed(100 + i)
        pm = fresh_adapter(model, config, "default", seed=7)
        states.append({n: p.clone() for n, p in pm.state_dict().items() if ".default." in n})
        assert pm.active_adapters == ["default"] and {n for n, p in pm.named_parameters() if p.requires_grad} == set(states[-1])
    assert all(m is slot[n] for n, m in reused.named_modules() if n.endswith("lora_A.default"))
    assert all(s.keys() == states[0].keys() and all(torch.equal(s[n], states[0][n]) for n in s) for s in states)
    assert any(p.abs().sum() > 0 for n, p in states[0].items() if "lora_A" in n)
    other = fresh_adapter(reused, LoraConfig(r=3, target_modules=["q_proj"]), "default", seed=7)  # another config: replaced
    assert {p.shape[0] for n, p in other.named_parameters() if "lora_A.default" in n} == {3}


@pytest.mark.parametrize("call", [check_fits, lambda m, w: attach(m, w, "x")], ids=["check_fits", "attach"])
def test_adapter_of_another_hidden_size_is_refused(tiny, call):
    model, _ = tiny
    w = _random_weights(model, 4)
    other = tiny_llama(hidden_size=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(MTAError, match=r"does not fit the base model: model\.layers\.\d\.\S+ is \d+x48"):
        call(other, w)
    # nothing injected half-way: still a plain model with its own weights
    assert not any("lora" in n for n, _ in other.named_modules())
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_adapter_for_a_missing_layer_is_refused(tiny):
    model, _ = tiny
    w = LoraWeights({"model.layers.7.self_attn.q_proj": (torch.zeros(2, 32), torch.zeros(32, 2))})
    with pytest.raises(MTAError, match="no linear layer 'model.layers.7.self_attn.q_proj'"):
        check_fits(model, w)


def test_from_peft_dir_bad_folders(tiny_model_dir, tmp_path):
    model, _ = load_base(str(tiny_model_dir), device="cpu")
    _random_peft_adapter(model, tmp_path / "a", r=2, lora_alpha=2)
    with pytest.raises(MTAError, match="adapter config not found"):
        LoraWeights.from_peft_dir(tmp_path / "missing")

    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(MTAError, match="only plain LoRA adapters"):
        LoraWeights.from_peft_dir(tmp_path / "a")
    cfg_path.write_text(json.dumps(cfg))

    st = tmp_path / "a" / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    with pytest.raises(MTAError, match="truncated or corrupt"):
        LoraWeights.from_peft_dir(tmp_path / "a")


def test_from_peft_state_dict_needs_both_factors():
    a = torch.zeros(2, 4)
    with pytest.raises(MTAError, match="lora_B.weight is missing"):
        LoraWeights.from_peft_state_dict({"base_model.model.x.lora_A.weight": a}, {"r": 2})
    with pytest.raises(MTAError, match="no LoRA tensors found"):
        LoraWeights.from_peft_state_dict({"something.weight": a}, {"r": 2})


def test_folded_is_the_adapter_and_puts_the_very_weights_back(tiny, input_ids):
    model, _ = tiny
    w = _random_weights(model, rank=3)
    peft_model = attach(model, w, "x")
    want = logits(peft_model, input_ids)
    model = peft_model.unload()
    params = dict(model.named_parameters())
    copies = {n: p.detach().clone() for n, p in params.items()}

    def untouched():
        return all(p is params[n] and torch.equal(p, copies[n]) for n, p in model.named_parameters())

    with folded(model, w):
        torch.testing.assert_close(logits(model, input_ids), want, atol=1e-5, rtol=1e-5)
        assert not untouched()
    assert untouched()
    with pytest.raises(RuntimeError, match="midway"), folded(model, w):
        raise RuntimeError("midway")
    assert untouched()
    with folded(model, None):
        assert untouched()
    bad = LoraWeights({"model.layers.0.self_attn.q_proj": (torch.zeros(2, 7), torch.zeros(7, 2))})
    with pytest.raises(MTAError, match="does not fit"), folded(model, bad):
        pass
    assert untouched()
