"""Stage 2: weighting and merging of anchor LoRAs, checked against the math they claim to compute."""

import numpy as np
import pytest
import torch
from conftest import RANDOM_ANCHOR_EMBEDDINGS, logits, write_random_bank
from peft import PeftModel

from mta.adapters import attach
from mta.config import FusionConfig
from mta.fusion import MERGE_METHODS, WEIGHTINGS, FusionRecord, fuse, merge, merge_svd, plan_fusion, resolve
from mta.io import MTAError
from mta.models import load_base

METHODS = ["exact", "linear", "svd"]
IDS3 = ["anchor_000", "anchor_001", "anchor_003"]
W3 = [0.5, 0.3, 0.2]


def _fresh(model_dir):
    return load_base(str(model_dir), device="cpu")[0]


def _dense_delta(bank, ids, weights, name):
    return sum(w * bank.anchor(a).delta(name) for a, w in zip(ids, weights))


# -- a single anchor ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_single_anchor_weight_one_reproduces_the_anchor(random_bank, tiny_model_dir, input_ids, method):
    anchor_dir = random_bank.path / "anchors" / "anchor_002"
    want = logits(PeftModel.from_pretrained(_fresh(tiny_model_dir), anchor_dir), input_ids)
    fused = merge(random_bank, FusionRecord(["anchor_002"], [1.0], [1.0], method))  # svd: rank None = the anchor's rank, full
    got = logits(attach(_fresh(tiny_model_dir), fused, "fused"), input_ids)
    assert not torch.allclose(want, logits(_fresh(tiny_model_dir), input_ids), atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_fuse_with_k1_picks_the_identical_anchor_with_weight_one(random_bank, method):
    fused, record = fuse(random_bank, np.array(RANDOM_ANCHOR_EMBEDDINGS[1]) * 3, FusionConfig(k=1, merge=method))
    assert (record.anchor_ids, record.weights) == (["anchor_001"], [1.0])
    assert record.similarities == pytest.approx([1.0])
    anchor = random_bank.anchor("anchor_001")
    for n in anchor.modules:
        torch.testing.assert_close(fused.delta(n), anchor.delta(n), atol=1e-5, rtol=1e-4)


# -- exact / linear / svd against their formulas ---------------------------------------------------------------------

def test_exact_is_the_weighted_sum_of_deltas(random_bank):
    fused = merge(random_bank, FusionRecord(IDS3, [0.9, 0.8, 0.7], W3, "exact"))
    assert fused.rank == 3 * 4
    assert fused.modules.keys() == random_bank.anchor("anchor_000").modules.keys()
    for n in fused.modules:
        torch.testing.assert_close(fused.delta(n), _dense_delta(random_bank, IDS3, W3, n), atol=1e-6, rtol=1e-5)


def test_exact_logits_equal_the_base_with_merged_weights(random_bank, tiny_model_dir, input_ids):
    fused = merge(random_bank, FusionRecord(IDS3, [0.9, 0.8, 0.7], W3, "exact"))
    dense = _fresh(tiny_model_dir)
    with torch.no_grad():
        for n in fused.modules:
            dense.get_submodule(n).weight += _dense_delta(random_bank, IDS3, W3, n)
    got = logits(attach(_fresh(tiny_model_dir), fused, "fused"), input_ids)
    torch.testing.assert_close(got, logits(dense, input_ids), atol=1e-4, rtol=1e-4)


def test_linear_is_the_elementwise_formula(random_bank):
    fused = merge(random_bank, FusionRecord(IDS3, [0.9, 0.8, 0.7], W3, "linear"))
    assert fused.rank == 4
    anchors = [random_bank.anchor(a) for a in IDS3]
    for n, (a, b) in fused.modules.items():
        torch.testing.assert_close(a, sum(w * x.modules[n][0] for w, x in zip(W3, anchors)))
        torch.testing.assert_close(b, sum(w * x.modules[n][1] for w, x in zip(W3, anchors)))
    # unlike exact, its ΔW carries cross terms wᵢwⱼ·Bᵢ·Aⱼ
    n = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(fused.delta(n), _dense_delta(random_bank, IDS3, W3, n), atol=1e-3)


def test_svd_at_full_rank_equals_exact(random_bank):
    ids, w = IDS3[:2], [0.6, 0.4]
    exact = merge(random_bank, FusionRecord(ids, [0, 0], w, "exact"))
    svd = merge(random_bank, FusionRecord(ids, [0, 0], w, "svd", rank=8))
    for n in exact.modules:
        torch.testing.assert_close(svd.delta(n), exact.delta(n), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rank", [1, 2, 4, 6])
def test_svd_below_full_rank_is_the_best_approximation(random_bank, rank):
    ids, w = IDS3[:2], [0.6, 0.4]
    svd = merge(random_bank, FusionRecord(ids, [0, 0], w, "svd", rank=rank))
    for n, (a, b) in svd.modules.items():
        assert a.shape[0] == b.shape[1] == rank
        dense = _dense_delta(random_bank, ids, w, n)
        s = torch.linalg.svdvals(dense)
        approx = svd.delta(n)
        torch.testing.assert_close(torch.linalg.svdvals(approx)[:rank], s[:rank], atol=1e-5, rtol=1e-4)
        # Eckart–Young: the error of the best rank-r approximation is the tail of the spectrum
        err = torch.linalg.matrix_norm(dense - approx)
        assert err.item() == pytest.approx(s[rank:].square().sum().sqrt().item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("rank", [None, 8, 100])
def test_svd_rank_above_a_layer_size_is_capped(rank):
    """k·r = 8 factors for a 6x10 layer: rank above 6 must mean "all of it", not a shape error."""
    gen = torch.Generator().manual_seed(0)
    As = [torch.randn(4, 10, generator=gen) for _ in range(2)]
    Bs = [torch.randn(6, 4, generator=gen) for _ in range(2)]
    w = torch.tensor([0.7, 0.3])
    a, b = merge_svd(As, Bs, w, rank)
    want = sum(wi * bi @ ai for wi, ai, bi in zip(w, As, Bs))
    assert a.shape[0] == b.shape[1] <= 6
    if rank is None:  # the anchors' rank: 4 of 6 singular values
        s = torch.linalg.svdvals(want)
        torch.testing.assert_close(torch.linalg.svdvals(b @ a)[:4], s[:4], atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(b @ a, want, atol=1e-5, rtol=1e-4)


def test_linear_needs_equal_ranks():
    with pytest.raises(MTAError, match="equal rank"):
        MERGE_METHODS["linear"]([torch.zeros(2, 3), torch.zeros(4, 3)], [torch.zeros(5, 2), torch.zeros(5, 4)], torch.ones(2), None)


# -- weighting -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["normalized", "softmax"])
@pytest.mark.parametrize("sims", [[0.9, 0.5, 0.4, 0.1], [0.31, 0.3, 0.29], [0.8, -0.2, -0.5], [0.99, 0.98]])
def test_weights_are_monotone_in_similarity(weighting, sims):
    w = WEIGHTINGS[weighting](torch.tensor(sims), 0.1)
    assert w.sum().item() == pytest.approx(1.0)
    assert (w >= 0).all()
    assert all(w[i] >= w[i + 1] for i in range(len(sims) - 1)), w
    assert w[0] > w[-1]


def test_normalized_is_proportional_and_clips_negatives():
    torch.testing.assert_close(WEIGHTINGS["normalized"](torch.tensor([0.6, 0.3, -0.4]), 0.1), torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(WEIGHTINGS["normalized"](torch.tensor([-0.1, -0.3]), 0.1), torch.tensor([0.5, 0.5]))


def test_softmax_temperature_sharpens():
    sims = torch.tensor([0.5, 0.4])
    hot, cold = WEIGHTINGS["softmax"](sims, 1.0), WEIGHTINGS["softmax"](sims, 0.01)
    assert 0.5 < hot[0] < cold[0]
    assert cold[0].item() == pytest.approx(1.0, abs=1e-4)


def test_published_weighting_gives_the_most_similar_anchor_the_smaller_weight():
    """We reproduce the published MTA code: α = s₁/(s₁+s₂) goes to the *second* anchor.

    So with s₁ > s₂ the most similar anchor weighs 1−α < ½. This looks inverted, but it is what the
    paper's released code does; `normalized` is the intuitive alternative.
    """
    w = WEIGHTINGS["published"](torch.tensor([0.9, 0.6]), 0.1)
    torch.testing.assert_close(w, torch.tensor([0.4, 0.6]))
    assert w[0] < w[1]
    with pytest.raises(MTAError, match="exactly two anchors"):
        WEIGHTINGS["published"](torch.tensor([0.9, 0.6, 0.3]), 0.1)


def test_recipe_preset_is_top2_linear_published():
    eff = resolve(FusionConfig(k=4, merge="recipe"))
    assert (eff.k, eff.merge, eff.weighting) == (2, "linear", "published")


def test_recipe_end_to_end(random_bank):
    user = np.array([0.9, 0.3, 0.0])
    fused, record = fuse(random_bank, user, FusionConfig(merge="recipe"))
    assert record.merge == "recipe"
    assert record.anchor_ids == ["anchor_000", "anchor_003"]  # cosines 0.95 and 0.82, most similar first
    s1, s2 = record.similarities
    assert record.weights == pytest.approx([s2 / (s1 + s2), s1 / (s1 + s2)])
    assert record.weights[0] < record.weights[1]
    linear = merge(random_bank, FusionRecord(record.anchor_ids, record.similarities, record.weights, "linear"))
    for n in fused.modules:
        assert torch.equal(fused.modules[n][0], linear.modules[n][0]) and torch.equal(fused.modules[n][1], linear.modules[n][1])


# -- planning --------------------------------------------------------------------------------------------------------

def test_plan_picks_top_k_by_cosine(random_bank):
    user = np.array([0.1, 0.9, 0.2], dtype=np.float32)
    record = plan_fusion(random_bank, user, FusionConfig(k=3))
    e = np.asarray(RANDOM_ANCHOR_EMBEDDINGS)
    cos = e @ user / np.linalg.norm(e, axis=1) / np.linalg.norm(user)
    order = np.argsort(-cos)[:3]
    assert record.anchor_ids == [f"anchor_{i:03d}" for i in order]
    assert record.similarities == pytest.approx(cos[order].tolist(), abs=1e-6)
    assert record.weights == pytest.approx((cos[order] / cos[order].sum()).tolist(), abs=1e-6)
    assert (record.merge, record.rank) == ("exact", None)


@pytest.mark.parametrize("scale", [0.5, 2.0])
@pytest.mark.parametrize("merge_method, power", [("exact", 1), ("recipe", 2)])  # factor averaging scales A and B alike
def test_scale_is_the_weights_sum_and_scales_the_delta(random_bank, scale, merge_method, power):
    user = np.array([0.1, 0.9, 0.2], dtype=np.float32)
    k = 2 if merge_method == "recipe" else 3
    full = plan_fusion(random_bank, user, FusionConfig(k=k, merge=merge_method))
    scaled = plan_fusion(random_bank, user, FusionConfig(k=k, merge=merge_method, scale=scale))
    assert scaled.anchor_ids == full.anchor_ids and sum(scaled.weights) == pytest.approx(scale)
    a, b = merge(random_bank, full), merge(random_bank, scaled)  # the record carries the scale: a rebuild needs nothing else
    for n in a.modules:
        torch.testing.assert_close(b.delta(n), scale**power * a.delta(n), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("change", [{"scale": 0.0}, {"scale": -1.0}, {"scale": float("nan")}, {"k": 0},
                                    {"temperature": 0.0}, {"temperature": float("inf")}, {"rank": 0}])
def test_settings_are_checked_when_made(change):
    with pytest.raises(MTAError, match="must be"):
        FusionConfig(**change)


@pytest.mark.parametrize("k", [5, 50])
def test_k_out_of_range(random_bank, k):
    with pytest.raises(MTAError, match=rf"k={k} is out of range: the bank has 4 anchor\(s\)"):
        plan_fusion(random_bank, np.ones(3), FusionConfig(k=k))


def test_recipe_needs_two_anchors(tmp_path, tiny_model_dir):
    one = write_random_bank(tmp_path / "one", tiny_model_dir, embeddings=[[1.0, 0.0, 0.0]])
    assert len(one) == 1
    with pytest.raises(MTAError, match=r"k=2 is out of range: the bank has 1 anchor"):
        plan_fusion(one, np.ones(3), FusionConfig(merge="recipe"))


def test_user_embedding_of_other_dimension(random_bank):
    with pytest.raises(MTAError, match="user embedding has 384 dims, the bank's anchors 3"):
        plan_fusion(random_bank, np.ones(384), FusionConfig())


@pytest.mark.parametrize("cfg, message", [
    (FusionConfig(merge="ties"), "unknown merge method 'ties'; known: exact, linear, svd, recipe"),
    (FusionConfig(weighting="rank"), "unknown weighting 'rank'"),
])
def test_unknown_methods(random_bank, cfg, message):
    with pytest.raises(MTAError, match=message):
        plan_fusion(random_bank, np.ones(3), cfg)


def test_merge_refuses_unknown_method_in_record(random_bank):
    with pytest.raises(MTAError, match="unknown merge method 'ties'"):
        merge(random_bank, FusionRecord(["anchor_000"], [1.0], [1.0], "ties"))


def test_fusion_record_round_trip():
    r = FusionRecord(["a", "b"], [0.9, 0.5], [0.6, 0.4], "svd", 3)
    assert FusionRecord.from_dict(r.to_dict()) == r
    with pytest.raises(MTAError, match="malformed fusion record"):
        FusionRecord.from_dict({"anchor_ids": ["a"], "weights": [1.0], "merge": "exact"})


@pytest.mark.parametrize("cfg, emb", [
    (FusionConfig(k=2, weighting="softmax", temperature=1e-300), [1.0, 0.0, 0.0]),  # similarities / temperature overflow
    (FusionConfig(k=2, weighting="published", merge="linear"), [0.0, 0.0, -1.0]),  # α = s1/(s1+s2) with s1 = s2 = 0
], ids=["softmax-overflow", "published-zero-sum"])
def test_weights_that_are_not_finite_are_refused(random_bank, cfg, emb):
    with pytest.raises(MTAError, match=r"fusion weights \[.*nan.*\] are not finite"):
        plan_fusion(random_bank, np.array(emb, dtype=np.float32), cfg)
