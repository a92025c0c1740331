"""Batched greedy generation: padding and batching never change an answer or its position."""

import torch

from mta.generation import generate
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
