"""Batched greedy generation: padding and batching never change an answer or its position."""

import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from mta.generation import NoRepeatInOutput, generate
from mta.training import prompt_ids

PROMPTS = ["Which tag?", "A clumsy wedding planner starts a silly prank war that spirals into a ridiculous feud.", "comedy",
           "A starship crew picks up a mysterious signal from beyond the galaxy while a rebel joins the resistance."]


def test_batched_equals_one_by_one_in_order(tiny):
    model, tok = tiny
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single and len(batched) == 4


def test_greedy_continuation_is_the_argmax(tiny):
    model, tok = tiny
    ids = torch.tensor([prompt_ids(tok, PROMPTS[1])])
    with torch.no_grad():
        first = model(input_ids=ids).logits[0, -1].argmax().item()
    out = generate(model, tok, [PROMPTS[1]], max_new_tokens=1)[0]
    assert out == tok.decode([first], skip_special_tokens=True).strip()


def test_no_prompts(tiny):
    assert generate(*tiny, [], max_new_tokens=3) == []


def test_no_repeat_rule_counts_generated_tokens_only():
    scores, inf = torch.zeros(1, 10), float("inf")
    ids = torch.tensor([[5, 6, 7, 5, 6]])  # prompt 5 6 7, then 5 6 generated: "5 6 7" is the prompt's, so 7 may follow
    assert torch.isfinite(NoRepeatInOutput(3, start=3)(ids, scores)).all()
    assert NoRepeatNGramLogitsProcessor(3)(ids, scores)[0, 7] == -inf  # transformers' own rule bans it
    ids = torch.tensor([[1, 2, 5, 6, 9, 5, 6]])  # generated 5 6 9 5 6: a 9 would repeat "5 6 9"
    out = NoRepeatInOutput(3, start=2)(ids, scores)[0]
    assert out[9] == -inf and torch.isfinite(out[torch.arange(10) != 9]).all()
