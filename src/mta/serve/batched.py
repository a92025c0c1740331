"""Batched multi-user generation: one forward pass, every batch row with its own low-rank update.

The Punica / S-LoRA idea on plain PyTorch: the base weights are shared, and for each adapted linear layer
the rows' LoRA factors are gathered into [batch, in, rank] and [batch, rank, out] tensors, so

    y = W x + (x Aᵀ_row) Bᵀ_row

costs two batched matmuls for the whole batch whatever the number of distinct users. A row's adapter is
a tuple of parts — a user's fused adapter and their stacked LoRA — laid side by side in the rank dimension
when a batch is gathered (as `LoraWeights.concat` would: the exact sum of the updates); a part may be
shared factors that each row scales by its own weights (`Scaled`), so users fused from the same anchors
share one prepared fused part in memory whatever their weights. Rows of lower rank, or with no adapter at all, are
zero-padded, and zeros add nothing. The layers are hooked only while a batch runs, so outside it the
model is untouched.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterator, TypeVar

import torch
from torch import Tensor, nn

from mta.adapters import LoraWeights, check_fits
from mta.config import Decoding
from mta.generation import rules as decoding_rules

Factors = dict[str, tuple[Tensor, Tensor]]  # module path → (Aᵀ [in, r], Bᵀ [r, out]), in the model's dtype and device


@dataclass(frozen=True)
class Scaled:
    """Shared factors with a row's own weights: each rank row of Bᵀ scaled by its weight as the batch is gathered.

    A user's exact fusion is the bank's anchors side by side with their B scaled by the user's weights, so every
    user fused from the same anchors shares one prepared copy and holds only their weights (a few floats a layer).
    """

    factors: Factors
    scales: dict[str, Tensor]  # module path → [r], one weight per rank row


Part = Factors | Scaled
Adapter = tuple[Part, ...]  # a row's parts, side by side in rank; () or None: the base model alone
T = TypeVar("T")


class LRUCache(Generic[T]):
    """Thread-safe LRU with hit/miss counts. Values are built outside the lock: a slow build blocks no one."""

    def __init__(self, capacity: int):
        self.capacity, self.hits, self.misses = capacity, 0, 0
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self.hits += 1
                self._items.move_to_end(key)
                return self._items[key]
            self.misses += 1
        value = build()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


class PerRowLora:
    """Adds each batch row's own LoRA update to the model's linear layers, via forward hooks."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        ref = next(model.parameters())
        self.dtype, self.device = ref.dtype, ref.device
        self._lock = threading.Lock()  # one batch at a time: the hooks hold that batch's factors

    def prepare(self, weights: LoraWeights) -> Factors:
        """Check, cast and transpose once, so that gathering a batch is only copies."""
        check_fits(self.model, weights)
        w = weights.to(self.dtype, self.device)
        return {n: (a.T.contiguous(), b.T.contiguous()) for n, (a, b) in w.modules.items()}

    def clone_base(self) -> nn.Module:
        """A private copy of the base model (for training), taken while no batch's hooks are attached."""
        with self._lock:
            return copy.deepcopy(self.model)

    @contextmanager
    def rows(self, adapters: list[Adapter | None]) -> Iterator[None]:
        """Within the block, row i of every forward gets the sum of adapters[i]'s parts (None: the base model alone)."""
        with self._lock:
            handles = []
            try:
                for name in sorted(set().union(*(_modules(p) for parts in adapters if parts for p in parts))):
                    at, bt = self._gather(name, adapters)
                    handles.append(self.linears[name].register_forward_hook(_lora_hook(at, bt)))
                yield
            finally:
                for h in handles:
                    h.remove()

    def _gather(self, name: str, adapters: list[Adapter | None]) -> tuple[Tensor, Tensor]:
        layer = self.linears[name]
        parts = [[_factors(p, name) for p in row or () if name in _modules(p)] for row in adapters]
        rank = max(sum(a.shape[1] for a, _ in row) for row in parts)
        at = torch.zeros(len(adapters), layer.in_features, rank, dtype=self.dtype, device=self.device)
        bt = torch.zeros(len(adapters), rank, layer.out_features, dtype=self.dtype, device=self.device)
        for i, row in enumerate(parts):
            start = 0
            for a, b in row:
                at[i, :, start: start + a.shape[1]] = a
                bt[i, start: start + b.shape[0]] = b
                start += a.shape[1]
        return at, bt


def _modules(part: Part) -> Factors:
    return part.factors if isinstance(part, Scaled) else part


def _factors(part: Part, name: str) -> tuple[Tensor, Tensor]:
    if isinstance(part, Scaled):
        a, b = part.factors[name]
        return a, b * part.scales[name][:, None]
    return part[name]


def _lora_hook(at: Tensor, bt: Tensor):
    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return torch.baddbmm(out, torch.bmm(args[0], at), bt)  # x [B, T, in] → W x + (x Aᵀ) Bᵀ, row by row

    return hook


@dataclass
class Row:
    prompt: list[int]  # token ids, already formatted and fitted
    adapter: Adapter | None
    max_new_tokens: int


@dataclass
class RowOutput:
    tokens: list[int]  # generated ids, without the end-of-sequence token
    stopped: bool  # True: ended by end-of-sequence; False: ran into max_new_tokens


@torch.no_grad()
def generate_rows(lora: PerRowLora, rows: list[Row], pad_token_id: int, eos_token_id: int | None,
                  decoding: Decoding = Decoding()) -> list[RowOutput]:
    """Greedy decoding of a batch of rows with a KV cache; left padding, so every row ends where generation starts.

    Position ids count real tokens only, so a padded row computes what it would alone. Rows that are done
    keep feeding padding until the last row finishes. `eos_token_id=None` never stops early (benchmarks).
    `decoding` applies as in `mta.generation.generate`.
    """
    model, n = lora.model, len(rows)
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        mask[i, width - len(r.prompt):] = 1
    ids, mask = ids.to(lora.device), mask.to(lora.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outputs = [RowOutput([], False) for _ in rows]
    done = [r.max_new_tokens <= 0 for r in rows]
    rules = decoding_rules(decoding, 0)
    generated = torch.empty((n, 0), dtype=torch.long, device=lora.device)  # every row starts together: one column a step
    cache = None
    with lora.rows([r.adapter for r in rows]):
        while not all(done):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            cache = out.past_key_values
            scores = out.logits[:, -1]
            for rule in rules:
                scores = rule(generated, scores)
            nxt = scores.argmax(-1).tolist()
            for i, tok in enumerate(nxt):
                if done[i]:
                    nxt[i] = pad_token_id
                elif tok == eos_token_id:
                    outputs[i].stopped, done[i] = True, True
                else:
                    outputs[i].tokens.append(tok)
                    done[i] = len(outputs[i].tokens) >= rows[i].max_new_tokens
            ids = torch.tensor(nxt, device=lora.device)[:, None]
            generated = torch.cat([generated, ids], 1)
            mask = torch.cat([mask, mask.new_ones(n, 1)], 1)
            positions = positions[:, -1:] + 1
    return outputs
