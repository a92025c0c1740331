"""Stage 2: adaptive LoRA fusion — a user's adapter merged on the fly from the closest anchors.

Weighting and merging are small functions behind registries (mergekit-style), so methods sit side by
side and benchmarks can swap them. Nothing here touches the disk: a fused adapter lives in memory.

* ``exact`` (default): ΔW = Σ wᵢ·Bᵢ·Aᵢ exactly, by concatenating ranks (rank k·r).
* ``linear``: A = Σ wᵢAᵢ and B = Σ wᵢBᵢ separately, as the published MTA code does; its ΔW carries the
  cross terms wᵢwⱼ·Bᵢ·Aⱼ.
* ``svd``: the exact ΔW truncated to a rank by SVD (done on the rank-k·r factors, never on a dense ΔW).
* ``recipe`` (a preset, not a merge): the published code — top-2 anchors, ``linear`` merging, and its
  α = s₁/(s₁+s₂) given to the *second* anchor, so the most similar anchor gets the smaller weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from mta.adapters import LoraWeights
from mta.bank import Bank
from mta.config import FusionConfig
from mta.io import MTAError

MergeFn = Callable[[list[Tensor], list[Tensor], Tensor, "int | None"], tuple[Tensor, Tensor]]
MERGE_METHODS: dict[str, MergeFn] = {}
WeightFn = Callable[[Tensor, float], Tensor]
WEIGHTINGS: dict[str, WeightFn] = {}


def register_merge(name: str):
    def deco(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = fn
        return fn
    return deco


def register_weighting(name: str):
    def deco(fn: WeightFn) -> WeightFn:
        WEIGHTINGS[name] = fn
        return fn
    return deco


@register_merge("exact")
def merge_exact(As: list[Tensor], Bs: list[Tensor], w: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    return torch.cat(As), torch.cat([wi * b for wi, b in zip(w, Bs)], 1)


@register_merge("linear")
def merge_linear(As: list[Tensor], Bs: list[Tensor], w: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    if len({a.shape for a in As}) > 1:
        raise MTAError("linear merging needs anchors of equal rank")
    return sum(wi * a for wi, a in zip(w, As)), sum(wi * b for wi, b in zip(w, Bs))


@register_merge("svd")
def merge_svd(As: list[Tensor], Bs: list[Tensor], w: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    a, b = merge_exact(As, Bs, w)
    qb, rb = torch.linalg.qr(b)  # ΔW = Qb (Rb Raᵀ) Qaᵀ: the SVD of a small core gives ΔW's
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    r = min(rank or max(x.shape[0] for x in As), len(s))  # ΔW has no more than min(out, in, k·r) directions
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]) @ qa.T, (qb @ u[:, :r]) * root


@register_weighting("normalized")
def weights_normalized(sims: Tensor, temperature: float) -> Tensor:
    """w ∝ similarity (negatives clipped): the most similar anchor weighs most."""
    s = sims.clamp(min=0)
    return s / s.sum() if s.sum() > 0 else torch.full_like(sims, 1 / len(sims))


@register_weighting("softmax")
def weights_softmax(sims: Tensor, temperature: float) -> Tensor:
    return torch.softmax(sims / temperature, 0)


@register_weighting("published")
def weights_published(sims: Tensor, temperature: float) -> Tensor:
    """The published code's α = s₁/(s₁+s₂), assigned to the second anchor."""
    if len(sims) != 2:
        raise MTAError("the published weighting is defined for exactly two anchors")
    alpha = sims[0] / (sims[0] + sims[1])
    return torch.stack([1 - alpha, alpha])


@dataclass
class FusionRecord:
    """Everything needed to rebuild a user's fused adapter from the bank: a few hundred bytes.

    `layer_weights` (picked or learned per user, mta.fusion_weights) gives some decoder layers, by index, weights of
    their own; every other layer takes `weights`. A record without it means what it always meant.
    """

    anchor_ids: list[str]
    similarities: list[float]
    weights: list[float]
    merge: str
    rank: int | None = None
    adapt: str = "fixed"
    layer_weights: dict[str, list[float]] | None = None

    def __post_init__(self):
        every = [self.weights, *(self.layer_weights or {}).values()]
        if any(len(w) != len(self.anchor_ids) or not all(math.isfinite(x) for x in w) for w in every):
            raise MTAError(f"fusion weights must be {len(self.anchor_ids)} finite numbers per layer, got {every}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FusionRecord":
        try:
            layers = d.get("layer_weights")
            return cls(list(d["anchor_ids"]), [float(x) for x in d["similarities"]], [float(x) for x in d["weights"]],
                       str(d["merge"]), d.get("rank"), str(d.get("adapt", "fixed")),
                       {str(k): [float(x) for x in v] for k, v in layers.items()} if layers else None)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise MTAError(f"malformed fusion record: {e}") from None

    def weights_at(self, module: str) -> list[float]:
        """The weights of the layer a module path lies in ("model.layers.12.mlp.up_proj" → layer 12)."""
        if self.layer_weights:
            layer = layer_index(module)
            return self.layer_weights.get(str(layer), self.weights)
        return self.weights


def layer_index(module: str) -> int | None:
    """The decoder layer of a module path: its first numeric component (transformers' ModuleList index)."""
    m = re.search(r"\.(\d+)(\.|$)", module)
    return int(m.group(1)) if m else None


def resolve(cfg: FusionConfig) -> FusionConfig:
    """The settings a merge runs with: `recipe` spelled out, method names checked against the registries."""
    if cfg.merge == "recipe":
        return FusionConfig(k=2, weighting="published", merge="linear", scale=cfg.scale)
    if cfg.merge not in MERGE_METHODS:
        raise MTAError(f"unknown merge method {cfg.merge!r}; known: {', '.join([*MERGE_METHODS, 'recipe'])}")
    if cfg.weighting not in WEIGHTINGS:
        raise MTAError(f"unknown weighting {cfg.weighting!r}; known: {', '.join(WEIGHTINGS)}")
    return cfg


def plan_fusion(bank: Bank, user_embedding: np.ndarray | Tensor, cfg: FusionConfig = FusionConfig()) -> FusionRecord:
    """Top-k anchors by cosine similarity and their weights; milliseconds, no weights touched."""
    eff = resolve(cfg)
    if not 1 <= eff.k <= len(bank):
        raise MTAError(f"k={eff.k} is out of range: the bank has {len(bank)} anchor(s)")
    u = torch.as_tensor(np.asarray(user_embedding, dtype=np.float32)).flatten()
    if u.shape[0] != bank.embeddings.shape[1]:
        raise MTAError(f"user embedding has {u.shape[0]} dims, the bank's anchors {bank.embeddings.shape[1]}: "
                       f"embed with {bank.manifest['embedding_model']!r}")
    sims = torch.nn.functional.cosine_similarity(bank.embeddings, u[None], dim=1)
    top = torch.topk(sims, eff.k).indices
    w = eff.scale * WEIGHTINGS[eff.weighting](sims[top], eff.temperature)
    if not torch.isfinite(w).all():  # e.g. softmax overflowing at a tiny temperature: never save or serve such a user
        raise MTAError(f"fusion weights {[round(x, 4) for x in w.tolist()]} are not finite (similarities "
                       f"{[round(x, 4) for x in sims[top].tolist()]}, weighting {eff.weighting}); raise the temperature or change the weighting")
    return FusionRecord([bank.anchor_ids[i] for i in top.tolist()], sims[top].tolist(), w.tolist(), cfg.merge, eff.rank, cfg.adapt)


def merge(bank: Bank, record: FusionRecord) -> LoraWeights:
    method = "linear" if record.merge == "recipe" else record.merge
    if method not in MERGE_METHODS:
        raise MTAError(f"unknown merge method {record.merge!r}")
    anchors = [bank.anchor(a) for a in record.anchor_ids]
    return LoraWeights({n: MERGE_METHODS[method]([x.modules[n][0] for x in anchors], [x.modules[n][1] for x in anchors],
                                                 torch.tensor(record.weights_at(n), dtype=torch.float32), record.rank)
                        for n in anchors[0].modules})


def unweighted(bank: Bank, anchor_ids: list[str]) -> LoraWeights:
    """The anchors' factors side by side at weight 1: the part of an exact fusion every user of these anchors shares."""
    return merge(bank, FusionRecord(list(anchor_ids), [0.0] * len(anchor_ids), [1.0] * len(anchor_ids), "exact"))


def row_weights(bank: Bank, record: FusionRecord) -> dict[str, Tensor]:
    """Per module, the weight of each rank row of `unweighted`'s factors in an exact fusion: B's rows scaled by them
    give `merge`'s B, so ΔW = Σᵢ wᵢ·Bᵢ·Aᵢ."""
    if record.merge != "exact":
        raise MTAError(f"only an exact fusion splits into shared factors and weights, not {record.merge!r}")
    anchors = [bank.anchor(a) for a in record.anchor_ids]
    return {n: torch.cat([torch.full((x.modules[n][0].shape[0],), w) for x, w in zip(anchors, record.weights_at(n))])
            for n in anchors[0].modules}


def fuse(bank: Bank, user_embedding: np.ndarray | Tensor, cfg: FusionConfig = FusionConfig()) -> tuple[LoraWeights, FusionRecord]:
    record = plan_fusion(bank, user_embedding, cfg)
    return merge(bank, record), record
