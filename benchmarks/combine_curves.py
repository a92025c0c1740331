"""One report from `mta bench` runs that asked the same eval users, with the same settings, in different conditions.

A run continued in a new folder (the first folder lost, or a history size added later) leaves its history sizes and
bank fractions in two results.json files. This checks that they are one experiment — the same task, split, methods
and settings (which sizes, fractions and whether the full profile ran aside) and no condition in two of them — and
writes results.json, results.md and results.png holding every condition. Each part's bank and run time are kept
under `config.parts`. A bank rebuilt from the same settings and users is taken as the same bank: fingerprints are
listed, not compared, since they cover the recorded training seconds.

Usage: python benchmarks/combine_curves.py RUN RUN [RUN ...] --out DIR
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from mta.bench import break_even_table, cost_of, plot_results, results_markdown
from mta.io import MTAError, atomic_write_bytes, atomic_write_json, read_json

SHAPE = ("history_sizes", "bank_fractions", "full_profile")  # what the parts may differ in


def _experiment(r: dict) -> list:
    bench = {k: v for k, v in r["config"]["bench"].items() if k not in SHAPE}
    return [r["task"], r["config"]["split"], bench, r["config"]["bank"]]


def combine(parts: list[dict]) -> dict:
    """The parts' conditions in one results dict; the cost and the bank's figures are the first part's."""
    first = parts[0]
    if any(_experiment(r) != _experiment(first) for r in parts[1:]):
        raise MTAError("these runs are not one experiment: their task, split, methods or settings differ")
    keys = [k for r in parts for k in r["seconds"]["conditions"]]
    if twice := sorted({k for k in keys if keys.count(k) > 1}):
        raise MTAError(f"condition(s) {', '.join(twice)} ran in more than one of these runs")
    if sum("bank_fractions" in r for r in parts) > 1:
        raise MTAError("more than one of these runs has a bank-size curve")
    out = copy.deepcopy(first)
    for r in parts[1:]:
        for block in ("history_sizes", "bank_fractions"):
            if block in r:
                out.setdefault(block, {}).update(r[block])
        if "methods" in r:
            out.update({k: r[k] for k in ("n_eval_answers", "n_eval_answers_in_bank", "methods", "mta_versus")})
        s = out["seconds"]
        s["total"] += r["seconds"]["total"]
        s["conditions"].update(r["seconds"]["conditions"])
        s["fraction_banks"].update(r["seconds"]["fraction_banks"])
    bench = out["config"]["bench"]
    bench["history_sizes"] = sorted({n for r in parts for n in r["config"]["bench"]["history_sizes"]})
    bench["bank_fractions"] = sorted({f for r in parts for f in r["config"]["bench"]["bank_fractions"]})
    bench["full_profile"] = any(r["config"]["bench"]["full_profile"] for r in parts)
    out["config"]["parts"] = [{"bank_path": r["config"]["bank_path"], "bank_fingerprint": r["config"]["bank_fingerprint"],
                               "bank_build_seconds": r["bank_build_seconds"], "seconds": r["seconds"]["total"],
                               **{k: r["config"]["bench"][k] for k in SHAPE}} for r in parts]
    out["break_even_users"] = break_even_table(cost_of(out)[0], out["bank_bytes"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders, each with a results.json")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if len(a.runs) < 2:
        p.error("give at least two runs to combine")
    try:
        results = combine([read_json(run / "results.json", "results") for run in a.runs])
    except MTAError as e:
        p.exit(2, f"error: {e}\n")
    report = results_markdown(results)
    atomic_write_json(a.out / "results.json", results)
    atomic_write_bytes(a.out / "results.md", report.encode())
    plot_results(results, a.out / "results.png")
    print(report)


if __name__ == "__main__":
    main()
