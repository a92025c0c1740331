"""One picture of issue 20's grid on the eval users: each fusion variant against the task's default, and against MTA's
parts (merge-only, stack-only) at the target's sizes, with 95 % paired intervals over users.

Reads the variants' versus.json written by fusion_eval.sh (folders named TASK-ADAPT-kK) and the powered run's
results.json for the default's own comparisons.
Usage: python benchmarks/fusion_grid_plot.py [--variants benchmarks/results/eval20] [--powered benchmarks/results/powered]
       [--out benchmarks/results/eval20/grid.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mta.io import read_json

ADAPTS = {"fixed": "fixed", "pick": "picked", "learn": "learned / anchor", "layer": "learned / anchor, layer"}
TASKS = {"lamp2": "LaMP-2", "lamp4": "LaMP-4"}
PARTS = ("merge-only", "stack-only")  # MTA's parts; the target's sizes are n = 2 and 4


def panels(parts: tuple[str, ...]) -> list[tuple[str, str]]:
    """(method, size) per panel: the default over all sizes, then each part at n = 2 and 4."""
    return [("mta", "all")] + [(m, n) for m in parts for n in ("2", "4")]


def rows(variants: Path, powered: Path, tag: str, parts: tuple[str, ...] = PARTS) -> list[tuple[str, dict]]:
    """(label, {(method, size): [diff, lo, hi]}) per variant, the default (the powered run's mta) first."""
    r = read_json(powered / tag / "results.json", "results")
    out = [(f"fixed, k = {r['config']['bench']['fusion']['k']} (default)", {("mta", "all"): [0.0, 0.0, 0.0]} | {
        (m, n): r["history_sizes"][n]["versus"][m] for m, n in panels(parts)[1:]})]
    for adapt in ADAPTS:
        for k in (1, 2, 4):
            f = variants / f"{tag}-{adapt}-k{k}" / "versus.json"
            if f.exists():
                v = read_json(f, "versus")
                out.append((f"{ADAPTS[adapt]}, k = {k}", {(m, n): (v["all"] if n == "all" else v["sizes"][n])["versus"][m]
                                                          for m, n in panels(parts)}))
    return out


def plot(variants: Path, powered: Path, path: Path, parts: tuple[str, ...] = PARTS) -> None:
    fig = Figure(figsize=(4 * len(panels(parts)), 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(TASKS), len(panels(parts)), sharey="row", squeeze=False)
    for row, tag in zip(axes, TASKS):
        data = rows(variants, powered, tag, parts)
        ys = range(len(data))[::-1]
        for ax, (method, size) in zip(row, panels(parts)):
            for y, (label, d) in zip(ys, data):
                diff, lo, hi = d[(method, size)]
                color = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray"
                ax.errorbar(diff, y, xerr=[[diff - lo], [hi - diff]], fmt="o", color=color, capsize=3)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_title(f"{TASKS[tag]} − {'default, all sizes' if method == 'mta' else f'{method}, n = {size}'}", fontsize=10)
        row[0].set_yticks(list(ys), [label for label, _ in data])
    fig.suptitle("Issue 20's fusion grid on the eval users, once each: paired differences, 95 % intervals over users "
                 "(green above, red below, grey level)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=Path, default=Path("benchmarks/results/eval20"))
    ap.add_argument("--powered", type=Path, default=Path("benchmarks/results/powered"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/eval20/grid.png"))
    a = ap.parse_args()
    plot(a.variants, a.powered, a.out)
