"""How much of a finished `mta bench` run rests on items its bank users' histories hold.

LaMP's users share items (the same movie, the same article), so an anchor may have trained on an eval answer's
item without ever seeing the eval user. For each run folder this prints, per method, the main metric on all answers,
on those whose item is in a bank user's history ("in bank") and on the rest ("unseen"), and saves them as
overlap.json in the folder. Runs made since `mta bench` learned this already hold `<metric>_unseen`; this
re-scores older ones from their predictions, with the same rule (`mta.bench.in_bank_histories`).

Usage: python benchmarks/overlap.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mta.bench import hold_out_items, in_bank_histories, main_metric_where
from mta.data.lamp import load_users, read_predictions
from mta.io import atomic_write_json
from mta.tasks import get_task


def overlap(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    task = get_task(results["task"])
    bank_users = load_users(run / "bank_users.json", task)
    eval_users = hold_out_items(task, load_users(run / "eval_users.json", task), results["config"]["bench"].get("eval_holdout", 0))
    queries = [q for u in eval_users for q in u.queries]
    golds = [q.gold for q in queries]
    seen = in_bank_histories(task, bank_users, eval_users)
    parts = {"all": [True] * len(seen), "in bank": seen, "unseen": [not x for x in seen]}
    methods = {}
    for name in results["methods"]:
        preds = read_predictions(run / "predictions" / f"{name}.json", task.id)
        answers = [preds[q.id] for q in queries]
        methods[name] = {part: main_metric_where(task, answers, golds, keep) for part, keep in parts.items()}
    report = {"task": task.id, "main_metric": task.main_metric, "n_answers": len(golds), "n_in_bank": sum(seen),
              "methods": methods}
    atomic_write_json(run / "overlap.json", report)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    for run in p.parse_args().runs:
        r = overlap(run)
        print(f"\n{run}: {r['task']}, {r['n_in_bank']} of {r['n_answers']} answers in a bank user's history")
        print(f"| method | {r['main_metric']} | in bank | unseen |\n|---|---|---|---|")
        for name, m in r["methods"].items():
            print(f"| {name} | " + " | ".join("–" if m[k] is None else f"{m[k]:.4f}" for k in ("all", "in bank", "unseen")) + " |")


if __name__ == "__main__":
    main()
