"""Batched greedy generation with the same prompt formatting as training."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from mta.config import Decoding
from mta.training import fit, prompt_ids


class NoRepeatInOutput(LogitsProcessor):
    """transformers' no_repeat_ngram_size over the generated tokens only.

    Its own rule also counts the prompt's n-grams, and a headline may well repeat words of the article it
    is for; what it should not do is loop ("X: X: X: ..."), as a small model near its base weights can.
    `start` is where generation began in `input_ids` (left padding: the same column for every row).
    """

    def __init__(self, ngram_size: int, start: int):
        self.rule, self.start = NoRepeatNGramLogitsProcessor(ngram_size), start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return self.rule(input_ids[:, self.start :], scores)


def rules(decoding: Decoding, start: int) -> list[LogitsProcessor]:
    """The logits processors that carry out `decoding`; `start`: where generation begins in the ids."""
    return [NoRepeatInOutput(decoding.no_repeat_ngram, start)] if decoding.no_repeat_ngram else []


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int,
             decoding: Decoding = Decoding(), batch_size: int = 8, max_length: int = 384, progress: bool = False,
             desc: str = "generating") -> list[str]:
    """Greedy outputs, stripped, in the order of `prompts`; batches are length-sorted to pad little."""
    encoded = [fit(prompt_ids(tokenizer, p), max_length) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every row ends where generation starts
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             logits_processor=LogitsProcessorList(rules(decoding, width)))
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return outputs
