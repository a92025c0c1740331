"""MTA's per-user training time against the per-user LoRA's (issue 20's budget: at most 1/3), at history sizes n.

Times exactly what `mta bench` times, each method's adapt (personalize one user and store them), with the task's
tuned settings, on bank users from n of their items (`mta.bench.history_split`). Nothing is answered or scored: it
is a cost measurement, so it may run as often as needed. As in the bench, each method personalizes every user in
turn, the first untimed (one-time costs); the users timed are the file's `--limit` after its first. (Alternating the
methods user by user measured MTA at 2.60 s/user on LaMP-4 at n = 2, against 1.73 in turn: the order matters.)
Needs a bank of the task (a bench run's OUT/bank: a user's compute does not depend on whose clusters it holds).

Usage: python benchmarks/train_cost.py --task LaMP-4 --bank runs/bench20/lamp4/bank \
           --users runs/bench20/lamp4/bank_users.json [--limit 12] [--sizes 2,4,8] [--out FILE.json] [mta bench options]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from mta.bank import Bank
from mta.bench import METHODS, Run, history_split, ratio_interval
from mta.cli import _bench_config, build_parser
from mta.data.lamp import load_users
from mta.io import MTAError, atomic_write_json
from mta.models import load_base, load_embedder
from mta.stacking import base_of
from mta.tasks import get_task

TIMED = ("mta", "per-user-lora")


def measure(task_id: str, bank_path: str, users_path: str, sizes: list[int], limit: int, bench_args: list[str]) -> dict:
    """Per size: each method's seconds per user (after one untimed user), their ratio with its interval."""
    task, bank = get_task(task_id), Bank.load(bank_path)
    args = ["bench", "--task", task.id, "--out", "-", "--reuse-bank", bank_path, *bench_args]
    cfg = _bench_config(build_parser().parse_args(args), task.id)
    cfg = replace(cfg, base_model=bank.manifest["base_model"], embedding_model=bank.manifest["embedding_model"])
    model, tokenizer = load_base(cfg.base_model)
    run = Run(cfg, task, tokenizer, load_embedder(cfg.embedding_model), bank, progress=False)
    users = load_users(users_path, task)[: limit + 1]
    out: dict = {"task": task.id, "bank": bank_path, "users": users_path, "bench_args": bench_args, "fusion": asdict(cfg.fusion),
                 "stack": asdict(cfg.stack), "user_lora_train": asdict(cfg.user_lora_train), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            seconds: dict[str, list[float]] = {m: [] for m in TIMED}
            for m in TIMED:
                model = base_of(model)  # as in the bench: a method's adapter layers stay from user to user
                for i, user in enumerate(history_split(task, users, n)):
                    start = time.perf_counter()
                    model, _ = METHODS[m].adapt(run, model, user, Path(tmp) / m / f"{n}-{user.user_id}")
                    if i:  # the first user of each size warms up, untimed
                        seconds[m].append(time.perf_counter() - start)
            r = sum(seconds["mta"]) / sum(seconds["per-user-lora"])
            lo, hi = ratio_interval(seconds["mta"], seconds["per-user-lora"])  # resampling users
            out["sizes"][str(n)] = {"users": len(seconds["mta"]), "ratio": r, "ratio_interval": [lo, hi],
                                    **{f"{m}_seconds_per_user": float(np.mean(s)) for m, s in seconds.items()},
                                    "seconds": seconds}
            print(f"{task.id} n={n}: mta {np.mean(seconds['mta']):.2f} s/user, per-user LoRA "
                  f"{np.mean(seconds['per-user-lora']):.2f} s/user, ratio {r:.3f} [{lo:.3f}, {hi:.3f}] "
                  f"({len(seconds['mta'])} users)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True)
    p.add_argument("--bank", required=True)
    p.add_argument("--users", required=True, help="bank users (a bench run's OUT/bank_users.json): never eval users")
    p.add_argument("--limit", type=int, default=12, help="the first this many users of the file are timed")
    p.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[2, 4, 8])
    p.add_argument("--out", help="JSON file for the figures")
    a, bench_args = p.parse_known_args()  # the rest are `mta bench` options, e.g. --fusion-adapt learn
    if a.limit < 1 or not a.sizes or min(a.sizes) < 1:
        p.exit(2, "train_cost.py: --limit and every size must be at least 1\n")
    try:
        out = measure(a.task, a.bank, a.users, a.sizes, a.limit, bench_args)
    except MTAError as e:
        p.exit(2, f"train_cost.py: {e}\n")
    if a.out:
        atomic_write_json(Path(a.out), out)


if __name__ == "__main__":
    main()
