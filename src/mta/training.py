"""One small supervised loop shared by anchor LoRAs, stacked LoRAs and the per-user baseline.

Loss on target tokens only; whatever parameters require grad are trained, so the caller decides what
is frozen (a fused adapter under a stacked one, say) by setting requires_grad. Two savings that change
no result: logits are computed at target positions only (the vocabulary projection is a large share
of a small model's step), and when the bottom decoder layers hold nothing to train (a stacked LoRA
on the top layers only), what they make of each example is computed once and reused every epoch.
"""

from __future__ import annotations

import inspect
import math
import random
import time
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from mta.config import TrainConfig
from mta.io import MTAError
from mta.models import mixed_precision
from mta.tasks import Example


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The chat-formatted prompt, ready for the answer, when the tokenizer is a chat model's."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt + "\n")["input_ids"]


def fit(ids: list[int], max_length: int, keep_head: int = 24) -> list[int]:
    """Cut the middle of an over-long prompt: the template's head and the question at the end survive."""
    if len(ids) <= max_length:
        return ids
    keep_head = min(keep_head, max_length // 2)  # a tiny max_length still keeps both ends, and is never exceeded
    return ids[:keep_head] + ids[len(ids) - (max_length - keep_head):]


def encode(tokenizer: PreTrainedTokenizerBase, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    target = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    target = target[: max_length // 2]
    prompt = fit(prompt_ids(tokenizer, ex.prompt), max_length - len(target))
    return prompt + target, [-100] * len(prompt) + target


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


class _Step:
    """Loss on target positions for one batch; enters at layer `start` when every example's input to it is cached."""

    _exact: dict[type, bool] = {}  # per model class: does entering at a layer reproduce the whole forward?

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], plain: bool = False):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.inner = model, inner
        self.slice_logits = not plain and "logits_to_keep" in inspect.signature(inner.forward).parameters
        self.start, self.cache, self.cached_steps = 0, {}, 0
        stack = None if plain else _decoder_layers(inner)
        if stack is not None:
            self.owner, self.attr, self.layers = stack
            self.start = _first_trained(self.layers, params)

    def __call__(self, batch: dict[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
        labels = batch["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100  # positions whose next token is a target
        targets = labels[:, 1:][keep[:, :-1]]
        if self.start and all(r in self.cache for r in rows):
            self.cached_steps += 1
            logits = self._from_cache(batch, rows, keep)
        else:
            logits = self._forward(batch, rows, keep)
        return F.cross_entropy(logits.float(), targets)

    def _logits(self, keep: torch.Tensor, **inputs) -> torch.Tensor:
        if self.slice_logits:  # the rows' target positions together: a 1-D index, which every transformers 5 takes
            cols = keep.any(0).nonzero().squeeze(1)
            return self.model(**inputs, logits_to_keep=cols).logits[keep[:, cols]]
        return self.model(**inputs).logits[keep]

    def _forward(self, batch, rows, keep) -> torch.Tensor:
        if not self.start:
            return self._logits(keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        seen = {}

        def grab(module, args, kwargs):
            seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

        hook = self.layers[self.start].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            logits = self._logits(keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            hook.remove()
        lengths = batch["attention_mask"].sum(1).tolist()
        for r, h, n in zip(rows, seen["h"], lengths):
            self.cache[r] = h[:n]
        if type(self.inner) not in self._exact:  # checked once per architecture, at the cost of one top-only forward
            with torch.no_grad():
                again = self._from_cache(batch, rows, keep)
            tol = 1e-4 if logits.dtype == torch.float32 else 2e-2
            self._exact[type(self.inner)] = ok = torch.allclose(again, logits.detach(), rtol=tol, atol=tol)
            if not ok:
                warnings.warn(f"{type(self.inner).__name__} cannot be entered at a decoder layer; its bottom layers run every step")
        if not self._exact[type(self.inner)]:
            self.start = 0
        return logits

    def _from_cache(self, batch, rows, keep) -> torch.Tensor:
        cached = [self.cache[r] for r in rows]
        h = cached[0].new_zeros(len(rows), batch["input_ids"].shape[1], cached[0].shape[-1])
        for i, c in enumerate(cached):
            h[i, : len(c)] = c  # right padding, as in _collate: padded positions are masked
        with _layers_from(self.owner, self.attr, self.layers, self.start):
            return self._logits(keep, inputs_embeds=h, attention_mask=batch["attention_mask"])


def _decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList] | None:
    """(owner, attribute name, layers) of the decoder stack: the module list with one entry per hidden layer."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for owner in model.modules():
        for attr, child in owner.named_children():
            if isinstance(child, torch.nn.ModuleList) and len(child) == n:
                return owner, attr, child
    return None


def _first_trained(layers: torch.nn.ModuleList, params: list[torch.nn.Parameter]) -> int:
    """How many bottom layers hold nothing to train; 0 unless every trained parameter lies above them."""
    trained = {id(p) for p in params}
    for i, layer in enumerate(layers):
        if any(id(p) in trained for p in layer.parameters()):
            above = {id(p) for later in layers[i:] for p in later.parameters()}  # a parameter may be shared by layers
            return i if trained <= above else 0
    return 0


@contextmanager
def _layers_from(owner: torch.nn.Module, attr: str, layers: torch.nn.ModuleList, start: int):
    """The model without its bottom `start` layers: its input embeddings are then layer `start`'s input."""
    setattr(owner, attr, layers[start:])
    try:
        yield
    finally:
        setattr(owner, attr, layers)


def train(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example], cfg: TrainConfig,
          desc: str = "training", progress: bool = True, plain: bool = False, groups: list[dict] | None = None) -> dict:
    """Train the parameters that require grad; returns losses, steps, seconds, tokens seen and cached steps.

    `groups`: optimizer parameter groups covering those parameters, for some with their own lr or weight decay
    (learned fusion weights); the schedule scales every group alike. `plain=True` is the textbook loop (all
    logits, every layer every step): the same result, slower; it is there to measure the two savings.
    """
    if not examples:
        raise MTAError(f"{desc}: no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MTAError(f"{desc}: nothing to train (no parameter requires grad)")
    device = params[0].device
    encoded = [encode(tokenizer, ex, cfg.max_length) for ex in examples]
    rng = random.Random(cfg.seed)
    batches_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = max(1, round(cfg.epochs * batches_per_epoch))
    if groups is not None and {id(p) for g in groups for p in g["params"]} != {id(p) for p in params}:
        raise MTAError(f"{desc}: the optimizer groups must hold exactly the parameters that require grad")
    opt = torch.optim.AdamW(groups or params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    amp = mixed_precision(device, getattr(model, "dtype", params[0].dtype), cfg.mixed_precision)
    model.train()
    step = _Step(model, params, plain)
    losses, tokens, start = [], 0, time.perf_counter()
    order: list[int] = []
    bar = tqdm(range(total), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        if len(order) < cfg.batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        rows = order[: cfg.batch_size]
        del order[: cfg.batch_size]
        inputs = _collate([encoded[i] for i in rows], tokenizer.pad_token_id, device)
        with amp:
            loss = step(inputs, rows)
        if not torch.isfinite(loss):  # diverged: stop before anything is saved
            raise MTAError(f"{desc}: the training loss is {loss.item()} at step {len(losses) + 1} of {total}; lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(inputs["attention_mask"].sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {"losses": losses, "steps": total, "seconds": time.perf_counter() - start, "tokens": tokens,
            "cached_steps": step.cached_steps, "cached_from_layer": step.start}


@torch.no_grad()
def mean_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example], cfg: TrainConfig) -> float:
    """The mean loss per target token over `examples`, as training computes it, without training: what a forward
    pass says of how well `model` already answers them."""
    if not examples:
        raise MTAError("no examples to score")
    encoded = [encode(tokenizer, ex, cfg.max_length) for ex in examples]
    device = next(model.parameters()).device
    amp = mixed_precision(device, getattr(model, "dtype", next(model.parameters()).dtype), cfg.mixed_precision)
    step, total, count = _Step(model, []), 0.0, 0
    model.eval()
    for start in range(0, len(encoded), cfg.batch_size):
        rows = list(range(start, min(start + cfg.batch_size, len(encoded))))
        batch = _collate([encoded[i] for i in rows], tokenizer.pad_token_id, device)
        n = int((batch["labels"][:, 1:] != -100).sum())
        with amp:
            total += float(step(batch, rows)) * n
        count += n
    return total / count
