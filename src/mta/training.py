"""One small supervised loop shared by anchor LoRAs, stacked LoRAs and the per-user baseline.

Loss on target tokens only; whatever parameters require grad are trained, so the caller decides what
is frozen (a fused adapter under a stacked one, say) by setting requires_grad.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from mta.io import MTAError
from mta.tasks import Example


@dataclass
class TrainConfig:
    epochs: float = 2.0
    learning_rate: float = 3e-4
    batch_size: int = 4
    max_length: int = 384
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0


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


def train(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example], cfg: TrainConfig,
          desc: str = "training", progress: bool = True) -> dict:
    """Train the parameters that require grad; returns losses, steps, seconds and tokens seen."""
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
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    order: list[int] = []
    bar = tqdm(range(total), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        if len(order) < cfg.batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        batch = [encoded[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        inputs = _collate(batch, tokenizer.pad_token_id, device)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(inputs["attention_mask"].sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {"losses": losses, "steps": total, "seconds": time.perf_counter() - start, "tokens": tokens}
