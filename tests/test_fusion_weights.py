"""Per-user fusion weights: picked by the user's loss, or learned with the stack — exact at the start, and every
consumer of a record (reload, export, per-row serving) answers with the learned weights."""

import dataclasses
import json

import pytest
import torch
from conftest import logits
from peft import PeftModel

from mta import fusion_weights
from mta.adapters import folded
from mta.config import FusionConfig, PersonalizeConfig, StackConfig, TrainConfig
from mta.data.lamp import User
from mta.export import export_user
from mta.fusion import FusionRecord, layer_index, merge, plan_fusion
from mta.io import MTAError
from mta.models import load_base
from mta.serve.batched import PerRowLora
from mta.stacking import STACK, _activate, load_personalized, personalize, save_user, user_adapters, with_adapters
from mta.tasks import get_task, loo_examples
from mta.training import mean_loss, train

TASK = get_task("LaMP-2")
FAST = TrainConfig(epochs=2, batch_size=4, max_length=128, learning_rate=1e-2)
TOP = StackConfig(rank=2, top_layers=1, train=FAST)  # the tiny model has 2 layers: the stack (and the gates) on layer 1
RECORD = FusionRecord(["anchor_000", "anchor_003"], [0.9, 0.8], [0.6, 0.4], "exact")


def _gated(tiny_model_dir, bank, record, per_layer=False):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    model = with_adapters(model, None, TOP)
    deltas = fusion_weights.add_gates(model, bank, record, [1], per_layer)
    model = _activate(model, [fusion_weights.GATES, STACK], trainable=True)
    for d in deltas.values():
        d.requires_grad_(True)
    return model, tok, deltas


def test_zero_learned_change_is_the_fixed_fusion_exactly(tiny_model_dir, random_bank, input_ids):
    fused = merge(random_bank, RECORD)
    plain = with_adapters(load_base(str(tiny_model_dir), device="cpu")[0], None, TOP)
    with folded(plain, fused):
        want = logits(plain, input_ids)
    gated, _, deltas = _gated(tiny_model_dir, random_bank, RECORD)
    with folded(gated, fused):
        assert torch.equal(logits(gated, input_ids), want)
    unchanged = fusion_weights.learned(RECORD, deltas)
    assert unchanged.layer_weights == {"1": RECORD.weights}
    assert all(torch.equal(merge(random_bank, unchanged).delta(n), fused.delta(n)) for n in fused.modules)


def test_gradients_reach_only_the_weights_and_the_stack(tiny_model_dir, random_bank, input_ids):
    model, _, deltas = _gated(tiny_model_dir, random_bank, RECORD, per_layer=True)
    with folded(model, merge(random_bank, RECORD)):
        model.train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(f".{STACK}." in n or n.endswith(".delta") for n in got)
    assert deltas[1].grad is not None and torch.count_nonzero(deltas[1].grad) == 2


def test_learning_keeps_entering_at_the_stacked_layer(tiny_model_dir, random_bank, users):
    model, tok, deltas = _gated(tiny_model_dir, random_bank, RECORD)
    learned = [deltas[1]]
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and p is not deltas[1]]},
              {"params": learned, "lr": 0.1}]
    with folded(model, merge(random_bank, RECORD)):
        stats = train(model, tok, loo_examples(TASK, users[0].profile), FAST, progress=False, groups=groups)
    assert stats["cached_from_layer"] == 1 and stats["cached_steps"] > 0
    assert torch.count_nonzero(deltas[1]) == 2  # it moved


def test_merge_takes_each_layers_own_weights(random_bank):
    record = dataclasses.replace(RECORD, layer_weights={"1": [0.3, -0.2]})
    merged, anchors = merge(random_bank, record), [random_bank.anchor(a) for a in RECORD.anchor_ids]
    for n in merged.modules:
        w = [0.3, -0.2] if layer_index(n) == 1 else RECORD.weights
        want = sum(wi * x.delta(n) for wi, x in zip(w, anchors))
        torch.testing.assert_close(merged.delta(n), want, atol=1e-6, rtol=1e-6)
    assert {layer_index(n) for n in merged.modules} == {0, 1}


def test_record_round_trips_and_old_records_mean_what_they_meant():
    learned = dataclasses.replace(RECORD, adapt="learn-layer", layer_weights={"1": [0.7, 0.1]})
    assert FusionRecord.from_dict(json.loads(json.dumps(learned.to_dict()))) == learned
    old = {k: v for k, v in RECORD.to_dict().items() if k not in ("adapt", "layer_weights")}
    assert FusionRecord.from_dict(old) == RECORD and RECORD.weights_at("model.layers.1.mlp.up_proj") == RECORD.weights
    with pytest.raises(MTAError, match="finite"):
        FusionRecord(["a"], [1.0], [float("nan")], "exact")
    with pytest.raises(MTAError, match="finite"):
        FusionRecord.from_dict({**learned.to_dict(), "layer_weights": {"1": [0.1]}})


def test_pick_takes_the_lowest_loss_of_the_grid(tiny_model_dir, random_bank, users):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    cfg = FusionConfig(k=1, adapt="pick", pick_k=[1, 2, 9], pick_scale=[0.5, 2.0])  # 9 > the bank's 4 anchors: skipped
    emb, examples = torch.tensor([1.0, 0.3, 0.0]), loo_examples(TASK, users[0].profile)
    losses = {}
    for k in (1, 2):
        for s in (0.5, 2.0):
            with folded(model, merge(random_bank, plan_fusion(random_bank, emb, dataclasses.replace(cfg, k=k, scale=s)))):
                losses[k, s] = mean_loss(model, tok, examples, FAST)
    picked = fusion_weights.pick(random_bank, emb, cfg, model, tok, examples, FAST)
    k, s = min(losses, key=losses.get)
    assert len(picked.anchor_ids) == k and sum(picked.weights) == pytest.approx(s) and picked.adapt == "pick"
    assert len(set(losses.values())) == 4
    with pytest.raises(MTAError, match="fits a bank of 4"):
        fusion_weights.pick(random_bank, emb, dataclasses.replace(cfg, pick_k=[5]), model, tok, examples, FAST)


def test_learned_fusion_needs_a_stack_and_the_exact_merge(random_bank, tiny_model_dir, users):
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    with pytest.raises(MTAError, match="train with the stacked LoRA"):
        personalize(random_bank, users[0], PersonalizeConfig(FusionConfig(adapt="learn"), None), model, tok, task=TASK)
    with pytest.raises(MTAError, match="exact merge"):
        FusionConfig(adapt="learn", merge="linear")


@pytest.fixture(scope="module")
def learned_user(tmp_path_factory, random_bank, tiny_model_dir, users):
    """A user personalized with weights learned per anchor and layer, kept visibly apart from the planned ones."""
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    anchors = {a: [t.clone() for ab in random_bank.anchor(a).modules.values() for t in ab] for a in random_bank.anchor_ids}

    class Embedder:  # a user near anchors 0 and 3
        def encode(self, texts, **kw):
            import numpy as np
            return np.tile(np.array([1.0, 0.4, 0.0], dtype=np.float32), (len(texts), 1))

    cfg = PersonalizeConfig(FusionConfig(k=2, adapt="learn-layer", learn_lr=0.3), TOP)
    model, record = personalize(random_bank, User("lea", users[0].profile), cfg, model, tok, Embedder(), TASK, progress=False)
    folder = tmp_path_factory.mktemp("learned") / "lea"
    save_user(folder, model, record, users[0].profile)
    return model, record, folder, base, anchors


def test_learning_moves_the_weights_and_nothing_frozen(learned_user, random_bank):
    model, record, _, base, anchors = learned_user
    f = record.fusion
    assert f.adapt == "learn-layer" and set(f.layer_weights) == {"1"}
    assert max(abs(a - b) for a, b in zip(f.layer_weights["1"], f.weights)) > 0.05
    assert not any(fusion_weights.GATES in n for n, _ in model.named_parameters())  # the gates are gone
    inner = dict(model.base_model.model.named_parameters())
    for n, p in base.items():  # the base weights are bit-identical
        assert torch.equal(inner[n if n in inner else n.replace(".weight", ".base_layer.weight")], p), n
    for a, tensors in anchors.items():  # so are the anchors' factors
        assert all(torch.equal(x, y) for x, y in zip(tensors, [t for ab in random_bank.anchor(a).modules.values() for t in ab]))


def test_reloaded_exported_and_served_outputs_equal_the_in_process_model(learned_user, random_bank, tiny_model_dir,
                                                                         input_ids, tmp_path):
    model, record, folder, _, _ = learned_user
    ours = logits(model, input_ids)
    reloaded = logits(load_personalized(random_bank, folder, load_base(str(tiny_model_dir), device="cpu")[0])[0], input_ids)
    torch.testing.assert_close(reloaded, ours, atol=1e-5, rtol=1e-5)

    export_user(random_bank, folder, tmp_path / "export")
    exported = PeftModel.from_pretrained(load_base(str(tiny_model_dir), device="cpu")[0], tmp_path / "export")
    torch.testing.assert_close(logits(exported, input_ids), ours, atol=1e-5, rtol=1e-5)

    served_model = load_base(str(tiny_model_dir), device="cpu")[0]
    lora = PerRowLora(served_model)
    _, fused, stacked = user_adapters(random_bank, folder)
    with lora.rows([(lora.prepare(fused), lora.prepare(stacked))]):  # the parts the server gathers side by side
        served = logits(served_model, input_ids)
    torch.testing.assert_close(served, ours, atol=1e-4, rtol=1e-4)

    planned = dataclasses.replace(record.fusion, layer_weights=None)  # the learned weights make a difference
    fixed = with_adapters(load_base(str(tiny_model_dir), device="cpu")[0], merge(random_bank, planned), stacked)
    assert not torch.allclose(logits(fixed, input_ids), ours, atol=1e-4)
