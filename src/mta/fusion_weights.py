"""Per-user fusion weights: which anchors a user's adapter trusts, and how much, decided by the user's own examples.

Planned fusion (`mta.fusion.plan_fusion`) weights the top-k anchors by similarity at a strength set per task.
Here the user's few leave-one-out examples decide instead (`FusionConfig.adapt`):

* ``pick``: k and strength from a small grid, by the loss of each candidate's fused adapter on those examples —
  forward passes only, no training.
* ``learn`` / ``learn-layer``: the weights become trainable scalars (one per anchor, or one per anchor and layer),
  trained jointly with the stacked LoRA while the anchors' factors stay frozen. ΔW = Σᵢ wᵢ·Bᵢ·Aᵢ stays exact: the
  planned weights w⁰ are folded into W with the rest of the fused adapter, and on the stacked layers a PEFT LoRA of
  the anchors' concatenated factors, whose B columns are scaled by the learned change Δw (zero at the start),
  adds Σᵢ Δwᵢ·Bᵢ·Aᵢ. Below the stacked layers the planned weights stay, so training still enters at the first
  stacked layer and reuses what the bottom layers made of each example.

The result is a `FusionRecord` whose `layer_weights` hold the learned weights: every consumer that rebuilds a fused
adapter from a record (generation, serving, export) uses them through `mta.fusion.merge`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mta.adapters import LoraWeights, attach, folded
from mta.bank import Bank
from mta.config import FusionConfig, TrainConfig
from mta.fusion import FusionRecord, layer_index, merge, plan_fusion
from mta.io import MTAError
from mta.tasks import Example
from mta.training import mean_loss

GATES = "fusion-gates"  # the PEFT adapter that carries the learned change while the stack trains


def pick(bank: Bank, embedding, cfg: FusionConfig, model: nn.Module, tokenizer, examples: list[Example],
         train: TrainConfig) -> FusionRecord:
    """The planned fusion, over `cfg.pick_k` × `cfg.pick_scale`, whose adapter has the lowest loss on `examples`
    (ties: the first in grid order)."""
    ks = [k for k in (cfg.pick_k or [cfg.k]) if k <= len(bank)]
    if not ks:
        raise MTAError(f"no k of {cfg.pick_k} fits a bank of {len(bank)} anchor(s)")
    best: tuple[float, FusionRecord] | None = None
    for k in ks:
        for scale in cfg.pick_scale:
            record = plan_fusion(bank, embedding, dataclasses.replace(cfg, k=k, scale=scale))
            with folded(model, merge(bank, record)):
                loss = mean_loss(model, tokenizer, examples, train)
            if best is None or loss < best[0]:
                best = (loss, record)
    return best[1]


class _Scaled(nn.Module):
    """lora_B's columns scaled by the learned change, one value per anchor repeated over its rank (a parametrization)."""

    def __init__(self, delta: nn.Parameter, rank: int):
        super().__init__()
        self.delta, self.rank = delta, rank

    def forward(self, b: Tensor) -> Tensor:
        return b * self.delta.repeat_interleave(self.rank).to(b.dtype)


def add_gates(model, bank: Bank, record: FusionRecord, layers: list[int], per_layer: bool) -> dict[int, nn.Parameter]:
    """Attach the trainable change of the fusion weights on `layers` to a PEFT model; returns it per layer (the same
    parameter on every layer unless `per_layer`). The caller activates the adapter and trains the parameters."""
    anchors = [bank.anchor(a) for a in record.anchor_ids]
    modules = [n for n in anchors[0].modules if layer_index(n) in layers]
    ranks = {a.shape[0] for x in anchors for n in modules for a, _ in [x.modules[n]]}
    if len(ranks) != 1:
        raise MTAError(f"learned fusion weights need anchors of one rank, the bank's have {sorted(ranks)}")
    rank = ranks.pop()
    unweighted = LoraWeights({n: (torch.cat([x.modules[n][0] for x in anchors]), torch.cat([x.modules[n][1] for x in anchors], 1))
                              for n in modules})
    model = attach(model, unweighted, GATES)
    ref = next(model.parameters())
    shared = nn.Parameter(torch.zeros(len(anchors), device=ref.device))
    deltas = {layer: nn.Parameter(torch.zeros(len(anchors), device=ref.device)) if per_layer else shared for layer in layers}
    for n in modules:
        lora_b = model.base_model.model.get_submodule(n).lora_B[GATES]
        parametrize.register_parametrization(lora_b, "weight", _Scaled(deltas[layer_index(n)], rank))
    return deltas


def learned(record: FusionRecord, deltas: dict[int, nn.Parameter]) -> FusionRecord:
    """The record with each gated layer's weights: the planned ones plus what was learned there."""
    layer_weights = {str(layer): [w + d for w, d in zip(record.weights, delta.detach().cpu().tolist())]
                     for layer, delta in sorted(deltas.items())}
    return dataclasses.replace(record, layer_weights=layer_weights)
