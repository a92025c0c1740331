"""Paired comparison of one method's answers in one `mta bench` run against methods of another run on the same users.

`mta bench` compares its methods within a run. A variant of MTA run on its own (another `--fusion-adapt`, another
k, on the same eval users and the same reused bank) is compared here against the first run's methods, answer by
answer, with the same paired bootstrap over users, per history size. The other run may be a published results
folder (`benchmarks/results/...`, LaMP predictions only): its answers are then matched by question id.

Each difference also gets the smallest true difference these users would show with confidence 80 % of the time
(95 % two-sided): what a variant must gain before a run this size can call it better.

Usage: python benchmarks/versus.py --ours RUN[:METHOD] --theirs RUN --methods merge-only stack-only [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import norm

from mta.bench import per_answer, user_interval, verdict, versus
from mta.data.lamp import load_users, read_predictions
from mta.io import MTAError, atomic_write_json, read_json
from mta.tasks import get_task

Z_95, Z_80 = norm.ppf(0.975), norm.ppf(0.80)  # 95 % two-sided, 80 % power


def compare(ours: Path, method: str, theirs: Path, names: list[str]) -> dict:
    """Per history size of `ours`, and over all its sizes together ("all"): its method's main metric with an
    interval, and minus each of `theirs`' methods (a user's answers at every size resampled together)."""
    r = read_json(ours / "results.json", "results")
    task = get_task(r["task"])
    out = {"task": task.id, "main_metric": task.main_metric, "ours": f"{ours}:{method}", "theirs": str(theirs), "sizes": {}}
    pooled: dict[str, list] = {"golds": [], "users": [], method: [], **{f"theirs:{m}": [] for m in names}}
    for n in sorted(r.get("history_sizes", {}), key=int):
        asked = load_users(ours / f"h{n}" / "eval_users.json", task)
        theirs_asked = theirs / f"h{n}" / "eval_users.json"  # a published results folder keeps none: ids are matched below
        if theirs_asked.exists() and asked != load_users(theirs_asked, task):
            raise MTAError(f"{ours} and {theirs} did not ask the same users the same questions at n = {n}")
        queries = [q for u in asked for q in u.queries]

        def outputs(run: Path, name: str) -> list[str]:
            answers = run / f"h{n}" / "answers" / f"{name}.json"
            saved = read_json(answers, "saved answers")["outputs"] if answers.exists() else \
                read_predictions(run / f"h{n}" / "predictions" / f"{name}.json", task.id)
            if missing := [q.id for q in queries if q.id not in saved]:
                raise MTAError(f"{run} has no answer to {len(missing)} of the questions asked at n = {n} (first: {missing[0]})")
            return [saved[q.id] for q in queries]

        pooled["golds"] += [q.gold for q in queries]
        pooled["users"] += [u.user_id for u in asked for _ in u.queries]
        pooled[method] += outputs(ours, method)
        for m in names:
            pooled[f"theirs:{m}"] += outputs(theirs, m)
        out["sizes"][n] = _block(task, method, names, {k: v[-len(queries):] for k, v in pooled.items()})
    out["all"] = _block(task, method, names, pooled)
    return out


def _block(task, method: str, names: list[str], answers: dict[str, list]) -> dict:
    golds, users, mine = answers["golds"], answers["users"], answers[method]
    per = per_answer(task, mine, golds)
    vs = {m: versus(task, mine, answers[f"theirs:{m}"], golds, users) for m in names}
    return {"n_answers": len(golds), "n_users": len(set(users)), method: list(user_interval(per, users)),
            "versus": {m: [v["diff"], *v["ci95"]] for m, v in vs.items()},
            "detectable": {m: detectable(v["ci95"]) for m, v in vs.items()}}


def detectable(ci95: list[float]) -> float:
    """The smallest true difference that the same number of users shows with confidence 80 % of the time, from the
    interval's width (standard error ≈ width / 3.92). It shrinks as 1/√users: k times the users, 1/√k of it."""
    lo, hi = ci95
    return float((Z_95 + Z_80) * (hi - lo) / (2 * Z_95))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", required=True, help="RUN[:METHOD], METHOD mta by default")
    p.add_argument("--theirs", required=True)
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--out")
    a = p.parse_args()
    run, _, method = a.ours.partition(":")
    try:
        result = compare(Path(run), method or "mta", Path(a.theirs), a.methods)
    except MTAError as e:
        p.exit(2, f"error: {e}\n")
    main_metric = result["main_metric"]
    for n, s in [*result["sizes"].items(), ("all", result["all"])]:
        mean, lo, hi = s[method or "mta"]
        print(f"n = {n} ({s['n_answers']} answers, {s['n_users']} users): {main_metric} {mean:.4f} [{lo:.3f}, {hi:.3f}]; "
              + "; ".join(f"− {m}: {d:+.4f} [{a_:+.3f}, {b:+.3f}] {verdict([d, a_, b], main_metric)}, "
                          f"detectable ±{s['detectable'][m]:.3f}" for m, (d, a_, b) in s["versus"].items()))
    if a.out:
        atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
