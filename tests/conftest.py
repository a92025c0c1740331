"""Tiny random models built from a config, so the suite never needs the 135M model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mta.data.synthetic import make_movie_tagging

SHARED_LAMP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lamp"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


def _tiny_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def movie_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "movies.json"
    path.write_text(json.dumps(make_movie_tagging(num_users=12, items_per_user=6, seed=0)))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, movie_data) -> Path:
    """A 2-layer Llama (hidden 32) with a BPE tokenizer trained on the synthetic data, saved as a local model."""
    users = json.loads(movie_data.read_text())
    corpus = [it["description"] + " " + it["tag"] for u in users for it in u["profile"]] + [q["input"] for u in users for q in u["query"]]
    tok = _tiny_tokenizer(corpus)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
