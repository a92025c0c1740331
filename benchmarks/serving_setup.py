"""Shared set-up of the serving benchmarks: a small but real bank on the default model, built once and cached.

Serving cost depends on adapter shapes, not on how well they were trained, so the bank is trained
briefly (4 anchors of rank 8, one small step each); users of the same synthetic LaMP-2 set that the bank
never saw are the ones served.
"""

from __future__ import annotations

import json
from pathlib import Path

from mta.bank import Bank, build_bank
from mta.config import DEFAULT_MODEL, AnchorConfig, BankConfig, TrainConfig
from mta.data.lamp import User, load_users
from mta.data.synthetic import make_movie_tagging
from mta.models import cache_dir
from mta.tasks import get_task

TASK = get_task("LaMP-2")
WORK = cache_dir() / "bench-serving"
NUM_BANK_USERS = 16


def serving_data() -> tuple[Path, list[User], list[User]]:
    """(data file, bank users, served users): 16 users build the bank, the other 32 are served."""
    path = WORK / "movie_tagging.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(make_movie_tagging(num_users=NUM_BANK_USERS + 32, items_per_user=8, seed=0)))
    users = load_users(path, TASK)
    return path, users[:NUM_BANK_USERS], users[NUM_BANK_USERS:]


def serving_bank(model=None, tokenizer=None, embedder=None) -> Bank:
    """The cached bank, or a new one (about a minute on 2 CPU cores; an interrupted build resumes)."""
    out = WORK / "bank"
    if (out / "manifest.json").exists():
        return Bank.load(out)
    _, bank_users, _ = serving_data()
    cfg = BankConfig(task=TASK.id, base_model=DEFAULT_MODEL, anchors=AnchorConfig(num_clusters=4, min_history=5),
                     train=TrainConfig(epochs=0.25, batch_size=2, max_length=128))
    return build_bank(bank_users, out, cfg, model, tokenizer, embedder)
