"""Stage 3: a fresh LoRA stacked on the frozen fused adapter, and the per-user folder that stores it."""

import dataclasses
import json

import pytest
import torch
from conftest import logits, snapshot, tiny_llama

from mta.adapters import folded
from mta.config import FusionConfig, PersonalizeConfig, StackConfig, TrainConfig
from mta.data.lamp import User
from mta.fusion import FusionRecord, merge, resolve
from mta.io import MTAError, load_tensors
from mta.models import load_base
from mta.stacking import (
    FUSED,
    STACK,
    UserRecord,
    load_personalized,
    load_profile,
    personalize,
    save_user,
    user_bytes,
    with_adapters,
)
from mta.tasks import get_task, loo_examples
from mta.training import train

TASK = get_task("LaMP-2")
FAST = TrainConfig(epochs=2, batch_size=4, max_length=128, learning_rate=1e-2)


@pytest.fixture(scope="module")
def fused(random_bank):
    return merge(random_bank, FusionRecord(["anchor_000", "anchor_003"], [0.9, 0.8], [0.6, 0.4], "exact"))


def _fresh(model_dir):
    return load_base(str(model_dir), device="cpu")[0]


@pytest.mark.parametrize("rank", [1, 4])
def test_zero_initialised_stack_leaves_logits_unchanged(tiny_model_dir, fused, input_ids, rank):
    base = logits(_fresh(tiny_model_dir), input_ids)
    fused_only = logits(with_adapters(_fresh(tiny_model_dir), fused, None), input_ids)
    model = with_adapters(_fresh(tiny_model_dir), fused, StackConfig(rank=rank))
    stacked = logits(model, input_ids)

    assert sorted(model.base_model.active_adapters) == sorted([FUSED, STACK])
    assert not torch.allclose(fused_only, base, atol=1e-3), "the fused adapter must be active"
    torch.testing.assert_close(stacked, fused_only, atol=1e-6, rtol=0)
    stack_b = [p for n, p in model.named_parameters() if f"lora_B.{STACK}." in n]
    assert stack_b and all(torch.count_nonzero(p) == 0 for p in stack_b)


def test_stack_training_changes_only_the_stacked_lora(tiny_model_dir, fused, users):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    model = with_adapters(model, fused, StackConfig(rank=2, train=FAST))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{STACK}." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(0)
    stats = train(model, tok, loo_examples(TASK, users[0].profile), FAST, progress=False)
    assert stats["steps"] == 4

    after = dict(model.named_parameters())
    frozen = [n for n in before if f".{STACK}." not in n]
    assert any(f".{FUSED}." in n for n in frozen) and any("embed_tokens" in n for n in frozen)
    for n in frozen:  # base weights and the fused adapter: bit-identical
        assert torch.equal(before[n], after[n]), n
    stacked = [n for n in before if f".{STACK}." in n]
    for n in stacked:
        if "lora_B" in n:
            assert not torch.equal(before[n], after[n]), n
    assert any(not torch.equal(before[n], after[n]) for n in stacked if "lora_A" in n)


def test_training_over_the_folded_fused_adapter_is_training_over_its_lora_layers(tiny_model_dir, fused, users):
    """personalize folds the frozen fused adapter into W while the stack trains: same stack, base weights back intact."""
    cfg = StackConfig(rank=2, train=dataclasses.replace(FAST, mixed_precision="no"))
    exs = loo_examples(TASK, users[0].profile)
    trained, init = [], None
    for fold in (True, False):
        model, tok = load_base(str(tiny_model_dir), device="cpu")
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        model = with_adapters(model, None if fold else fused, cfg)
        stack = {n: p for n, p in model.named_parameters() if f".{STACK}." in n}
        init = init or {n: p.detach().clone() for n, p in stack.items()}
        with torch.no_grad():  # the same starting stack (attaching the fused adapter first moves the RNG)
            for n, p in stack.items():
                p.copy_(init[n])
        with folded(model, fused if fold else None):
            losses = train(model, tok, exs, cfg.train, progress=False)["losses"]
        trained.append((losses, {n: p.detach().clone() for n, p in stack.items()}))
        if fold:
            plain = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()
                     if f".{STACK}." not in n}
            assert plain.keys() == base.keys() and all(torch.equal(plain[n], base[n]) for n in base)
    (folded_losses, got), (losses, want) = trained
    torch.testing.assert_close(torch.tensor(folded_losses), torch.tensor(losses), rtol=1e-4, atol=1e-5)
    assert got.keys() == want.keys() and got
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)


def test_stacked_lora_only_without_fusion(tiny_model_dir):
    model = with_adapters(_fresh(tiny_model_dir), None, StackConfig(rank=1))
    assert model.base_model.active_adapters == [STACK]
    assert all((f".{STACK}." in n) == p.requires_grad for n, p in model.named_parameters())


def test_top_layers_puts_the_stack_on_the_last_layers_only(tiny_model_dir, fused, input_ids):
    base = _fresh(tiny_model_dir)
    n = base.config.num_hidden_layers
    model = with_adapters(base, fused, StackConfig(rank=2, top_layers=1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f"layers.{n - 1}." in name for name in trainable)
    assert any(f".{FUSED}." in name and "layers.0." in name for name, _ in model.named_parameters())
    deeper = with_adapters(_fresh(tiny_model_dir), fused, StackConfig(top_layers=n + 5))  # more than the model has: all
    assert {n for n, p in deeper.named_parameters() if p.requires_grad} >= trainable
    assert any("layers.0." in name for name, p in deeper.named_parameters() if p.requires_grad)
    with pytest.raises(MTAError, match="top_layers must be at least 1"):
        with_adapters(_fresh(tiny_model_dir), fused, StackConfig(top_layers=0))
    with pytest.raises(MTAError, match="'all-linear' cannot be limited to the top layers"):
        with_adapters(_fresh(tiny_model_dir), fused, StackConfig(top_layers=1, target_modules="all-linear"))
    with pytest.raises(MTAError, match=r"modules \['c_fc'\] are not linear layers of this model \(it has \[.*'gate_proj'"):
        with_adapters(_fresh(tiny_model_dir), fused, StackConfig(top_layers=1, target_modules=["up_proj", "c_fc"]))


def test_with_adapters_rewraps_instead_of_nesting(tiny_model_dir, fused, input_ids):
    """Reusing one model for user after user: each call starts from the plain base weights."""
    model = with_adapters(_fresh(tiny_model_dir), fused, StackConfig())
    model = with_adapters(model, None, None)
    torch.testing.assert_close(logits(model, input_ids), logits(_fresh(tiny_model_dir), input_ids), atol=0, rtol=0)
    assert not any("lora" in n for n, _ in model.named_modules())


# -- personalize / save_user / load_personalized ---------------------------------------------------------------------

@pytest.mark.parametrize("fusion, stack", [
    (FusionConfig(k=2), StackConfig(rank=2, train=FAST)),
    (FusionConfig(k=2), StackConfig(rank=2, top_layers=1, train=FAST)),
    (FusionConfig(k=2), StackConfig(rank=1, target_modules=["gate_proj", "up_proj", "down_proj"], top_layers=1, train=FAST)),  # on the MLP
    (FusionConfig(k=3, merge="svd", rank=3), None),  # merge-only: no adapter folder
    (FusionConfig(merge="recipe"), StackConfig(rank=1, train=FAST)),
    (None, StackConfig(rank=2, train=FAST)),  # stack-only: no bank needed to load
], ids=["exact+stack", "exact+stack-top-layer", "exact+stack-top-layer-mlp", "svd-only", "recipe+stack", "stack-only"])
def test_save_and_load_give_identical_logits(tiny_bank, tiny_model_dir, users, embedder, tmp_path, input_ids, fusion, stack):
    user = users[1]
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    bank = tiny_bank if fusion else None
    model, record = personalize(bank, user, PersonalizeConfig(fusion, stack), model, tok, embedder, task=TASK, progress=False)
    want = logits(model, input_ids)
    size = save_user(tmp_path / "u", model, record, user.profile)

    assert size == user_bytes(tmp_path / "u") > 0
    assert (tmp_path / "u" / "adapter").exists() == (stack is not None)
    assert load_profile(tmp_path / "u") == user.profile
    saved = json.loads((tmp_path / "u" / "user.json").read_text())
    assert saved["user_id"] == user.user_id and saved["task"] == "LaMP-2"
    if fusion is None:
        assert saved["fusion"] is None and saved["bank_fingerprint"] is None
        assert saved["base_model"] == str(tiny_model_dir)
    else:
        assert saved["bank_fingerprint"] == tiny_bank.fingerprint
        assert len(saved["fusion"]["anchor_ids"]) == resolve(fusion).k
    if stack is not None:
        assert saved["stack"]["rank"] == stack.rank and saved["stack"]["steps"] > 0
        assert json.loads((tmp_path / "u" / "adapter" / "adapter_config.json").read_text())["r"] == stack.rank

    loaded, rec = load_personalized(bank, tmp_path / "u", _fresh(tiny_model_dir))
    assert rec == UserRecord.load(tmp_path / "u")
    torch.testing.assert_close(logits(loaded, input_ids), want, atol=1e-5, rtol=1e-5)


def test_a_bf16_stacked_lora_is_stored_in_bf16_and_loads_in_the_models_dtype(tiny_bank, tiny_model_dir, users, embedder,
                                                                                 tmp_path, input_ids):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    model, record = personalize(tiny_bank, users[1], PersonalizeConfig(FusionConfig(), StackConfig(rank=2, train=FAST)), model, tok,
                                embedder, task=TASK, progress=False)
    want = logits(model, input_ids)
    sizes = {}
    for dtype in ("fp32", "bf16"):
        save_user(tmp_path / dtype, model, record, users[1].profile, adapter_dtype=dtype)
        sizes[dtype] = (tmp_path / dtype / "adapter" / "adapter_model.safetensors").stat().st_size
        loaded, _ = load_personalized(tiny_bank, tmp_path / dtype, _fresh(tiny_model_dir))
        assert {p.dtype for p in loaded.parameters()} == {torch.float32}
        torch.testing.assert_close(logits(loaded, input_ids), want, atol=1e-5 if dtype == "fp32" else 1e-2, rtol=1e-2)
        tensors = load_tensors(tmp_path / dtype / "adapter" / "adapter_model.safetensors")
        assert {t.dtype for t in tensors.values()} == {torch.float32 if dtype == "fp32" else torch.bfloat16}
        sizes[dtype] -= sum(t.numel() * t.element_size() for t in tensors.values())  # the header: alike
    assert abs(sizes["bf16"] - sizes["fp32"]) <= 8 * len(tensors)


def test_personalize_changes_the_model(tiny_bank, tiny_model_dir, users, embedder, input_ids):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    model, record = personalize(tiny_bank, users[2], PersonalizeConfig(FusionConfig(k=2), StackConfig(train=FAST)), model, tok,
                                embedder, progress=False)
    assert record.stack["final_loss"] > 0
    assert not torch.allclose(logits(model, input_ids), logits(_fresh(tiny_model_dir), input_ids), atol=1e-4)


def test_empty_profile_is_refused(tiny_bank, tiny, embedder):
    model, tok = tiny
    with pytest.raises(MTAError, match="user 'nobody' has an empty profile: there is no history to personalize from"):
        personalize(tiny_bank, User("nobody", []), PersonalizeConfig(), model, tok, embedder, progress=False)


def test_fusion_needs_a_bank(tiny, users, embedder):
    model, tok = tiny
    with pytest.raises(MTAError, match="fusion needs a bank"):
        personalize(None, users[0], PersonalizeConfig(), model, tok, embedder, task=TASK, progress=False)


def test_personalize_refuses_a_model_of_another_base(tiny_bank, users, embedder):
    other = tiny_llama(hidden_size=48)
    with pytest.raises(MTAError, match=r"was built for base model .* the model given is \{.*'hidden_size': 48"):
        personalize(tiny_bank, users[0], PersonalizeConfig(), other, None, embedder, progress=False)
    assert not any("lora" in n for n, _ in other.named_modules())


def test_k_larger_than_the_bank(tiny_bank, tiny, users, embedder):
    model, tok = tiny
    with pytest.raises(MTAError, match=r"k=4 is out of range: the bank has 3 anchor\(s\)"):
        personalize(tiny_bank, users[0], PersonalizeConfig(FusionConfig(k=4)), model, tok, embedder, progress=False)


@pytest.fixture(scope="module")
def saved_user(tiny_bank, tiny_model_dir, users, embedder, tmp_path_factory):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    model, record = personalize(tiny_bank, users[3], PersonalizeConfig(FusionConfig(k=2), None), model, tok, embedder, progress=False)
    folder = tmp_path_factory.mktemp("user") / "u3"
    save_user(folder, model, record, users[3].profile)
    return folder


def test_load_needs_the_bank_it_was_fused_from(saved_user, random_bank, tiny_model_dir):
    with pytest.raises(MTAError, match="was fused from a bank: pass --bank"):
        load_personalized(None, saved_user, _fresh(tiny_model_dir))
    with pytest.raises(MTAError, match=f"was personalized against bank .*, not {random_bank.fingerprint}"):
        load_personalized(random_bank, saved_user, _fresh(tiny_model_dir))


@pytest.mark.parametrize("content, message", [
    ("{not json", "user record .* is not valid JSON"),
    (json.dumps({"user_id": "1", "task": "LaMP-2"}), "user record .* is malformed: missing 'base_model'"),
    (json.dumps({"user_id": "1", "task": "LaMP-2", "base_model": "m", "bank_fingerprint": "x", "stack": None,
                 "fusion": {"anchor_ids": ["a"]}}), "malformed fusion record"),
])
def test_malformed_user_record(saved_user, tmp_path, content, message):
    folder = tmp_path / "u"
    folder.mkdir()
    (folder / "user.json").write_text(content)
    with pytest.raises(MTAError, match=message):
        UserRecord.load(folder)


def test_missing_user_record_and_bad_profile(tmp_path):
    with pytest.raises(MTAError, match="user record not found"):
        UserRecord.load(tmp_path)
    (tmp_path / "profile.json").write_text('{"a": 1}')
    with pytest.raises(MTAError, match="must hold a list of profile items"):
        load_profile(tmp_path)


def test_save_user_replaces_a_folder_atomically(tiny_bank, saved_user, tmp_path, tiny_model_dir, users, embedder):
    """Re-personalizing into an existing folder swaps it whole: no stale adapter survives."""
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    model, record = personalize(tiny_bank, users[3], PersonalizeConfig(FusionConfig(k=2), StackConfig(rank=1, train=FAST)),
                                model, tok, embedder, progress=False)
    folder = tmp_path / "u"
    save_user(folder, model, record, users[3].profile)
    assert "adapter/adapter_model.safetensors" in snapshot(folder)
    _, merge_only = personalize(tiny_bank, users[3], PersonalizeConfig(FusionConfig(k=2), None), _fresh(tiny_model_dir), tok,
                                embedder, progress=False)
    save_user(folder, None, merge_only, users[3].profile)
    assert set(snapshot(folder)) == {"user.json", "profile.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["u"]  # no temp folders left beside it


def test_personalize_does_not_depend_on_what_ran_before(tiny_bank, tiny_model_dir, users, embedder, input_ids):
    cfg = PersonalizeConfig(FusionConfig(k=2), StackConfig(rank=2, train=FAST))
    outs = []
    for noise in (1, 2):
        torch.manual_seed(noise)
        torch.randn(100)  # other work consumed the global RNG
        model, tok = load_base(str(tiny_model_dir), device="cpu")
        model, record = personalize(tiny_bank, users[4], cfg, model, tok, embedder, progress=False)
        outs.append((logits(model, input_ids), record.fusion, record.stack["final_loss"]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0, rtol=0)
    assert outs[0][1:] == outs[1][1:]


def test_user_after_user_on_one_model_is_each_user_on_a_fresh_model(tiny_bank, tiny_model_dir, users, embedder, input_ids):
    """The adapter layers a model keeps from user to user (mta personalize, the bench, the server's adapt jobs) change
    nothing: every kind of user, in any order, gets the very stack, record and outputs of a fresh model."""
    stack = StackConfig(rank=2, top_layers=1, train=FAST)
    kinds = [PersonalizeConfig(FusionConfig(k=2), stack), PersonalizeConfig(FusionConfig(k=2, adapt="learn"), stack),
             PersonalizeConfig(None, StackConfig(rank=1, train=FAST)), PersonalizeConfig(FusionConfig(k=2), None),
             PersonalizeConfig(FusionConfig(k=2, adapt="pick", pick_k=[1, 2]), stack), PersonalizeConfig(FusionConfig(k=2), stack)]
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    for user, cfg in zip(users * 2, kinds):
        model, record = personalize(tiny_bank if cfg.fusion else None, user, cfg, model, tok, embedder, task=TASK, progress=False)
        fresh, want = personalize(tiny_bank if cfg.fusion else None, user, cfg, _fresh(tiny_model_dir), tok, embedder,
                                  task=TASK, progress=False)
        assert dataclasses.replace(record, stack=None) == dataclasses.replace(want, stack=None)
        assert (record.stack is None) == (want.stack is None)
        if want.stack is not None:
            assert record.stack["final_loss"] == want.stack["final_loss"]
        assert set(model.peft_config) == set(fresh.peft_config) | {FUSED}  # the fused layers stay, switched off
        torch.testing.assert_close(logits(model, input_ids), logits(fresh, input_ids), atol=0, rtol=0)
