"""The shared training loop: loss on target tokens only, prompts cut in the middle, clear errors."""

import pytest
import torch

from mta.io import MTAError
from mta.tasks import Example
from mta.training import TrainConfig, encode, fit, prompt_ids, train


@pytest.mark.parametrize("n, max_length, want", [
    (10, 20, list(range(10))),  # fits: untouched
    (100, 60, list(range(24)) + list(range(64, 100))),  # the template's head of 24 + the question at the end
    (100, 30, list(range(15)) + list(range(85, 100))),  # too short for a head of 24: half and half
    (100, 10, list(range(5)) + list(range(95, 100))),  # max_length under the head: still both ends, never longer
    (100, 1, [99]),
])
def test_fit(n, max_length, want):
    assert fit(list(range(n)), max_length) == want


def test_encode_masks_the_prompt(tiny):
    _, tok = tiny
    ids, labels = encode(tok, Example("Which tag?", "comedy"), 384)
    prompt = prompt_ids(tok, "Which tag?")
    target = tok("comedy", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == prompt + target
    assert labels == [-100] * len(prompt) + target
    assert tok.decode(prompt).startswith("<|im_start|>user\nWhich tag?<|im_end|>\n<|im_start|>assistant\n")


def test_encode_respects_max_length(tiny):
    _, tok = tiny
    ex = Example(" ".join(["comedy romance"] * 200), " ".join(["action"] * 100))
    target = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for max_length in (16, 64, 128, 1024):
        ids, labels = encode(tok, ex, max_length)
        assert len(ids) == len(labels) <= max_length
        kept = [x for x in labels if x != -100]
        assert kept == target[: max_length // 2]  # the target keeps at most half the budget, from its start
        assert ids[-len(kept):] == kept


def test_train_lowers_the_loss_of_what_requires_grad(tiny):
    model, tok = tiny
    for p in model.parameters():
        p.requires_grad = False
    head = model.model.norm.weight
    head.requires_grad = True
    before = {n: p.clone() for n, p in model.named_parameters()}
    stats = train(model, tok, [Example("Which tag?", "comedy")] * 4, TrainConfig(epochs=8, batch_size=4, learning_rate=0.05), progress=False)
    assert stats["steps"] == 8 and len(stats["losses"]) == 8 and stats["tokens"] > 0
    assert stats["losses"][-1] < stats["losses"][0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"model.norm.weight"}
    assert not model.training


def test_train_errors(tiny):
    model, tok = tiny
    with pytest.raises(MTAError, match="user 7: no training examples"):
        train(model, tok, [], TrainConfig(), desc="user 7")
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(MTAError, match="nothing to train"):
        train(model, tok, [Example("a", "b")], TrainConfig())
