"""Tuning sweep for `mta bench` (issue 3): MTA's settings and the baselines', on tuning users only.

The tuning users come out of the benchmark's *bank* users (same seeded split as benchmarks/run_lamp.sh),
so the benchmark's eval users are never seen here. A tuning bank is built from the remaining bank users.
Each tuning user answers its own query plus its last `--holdout` profile items, which are removed from
its profile first: three scored answers per personalization instead of one, at the same training cost.

Stages run in order (coordinate descent); each stage starts from the winners of the stages before it
(a stage not run now contributes the winner saved in the report). A winner is the trial with the best
mean, over both tasks, of its main metric divided by that task's best in the stage; in a per-task stage
(PER_TASK) each task takes its own best. Ties go to the earlier trial, the cheaper or pre-tuning setting.
Trials are resumable: a finished trial with the same settings (those its method uses) is read back, not rerun.

Usage: python benchmarks/tune.py [--out runs/tune] [--stages STAGE ...] [--cached-only]
Writes benchmarks/results/tuning.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from mta.anchors import AnchorConfig
from mta.bank import build_bank
from mta.bench import METHODS, BenchConfig, hold_out_items, run_bench, split_users
from mta.data.lamp import User, load_users
from mta.fusion import FusionConfig
from mta.generation import Decoding
from mta.io import atomic_write_bytes, atomic_write_json
from mta.models import load_base, load_embedder
from mta.stacking import StackConfig
from mta.tasks import get_task
from mta.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "lamp"
# task, data file, the benchmark's eval fraction (as in run_lamp.sh), tuning users drawn from its bank users
TASKS = [("LaMP-2", DATA / "movie_tagging.json", 0.3333, 8), ("LaMP-4", DATA / "news_headline.json", 0.375, 8)]

Override = Callable[[BenchConfig], BenchConfig]


def before_tuning(task: str) -> BenchConfig:
    """The settings before tuning (chosen by reasoning), spelled out so the sweep does not move with the defaults."""
    stack = StackConfig(rank=2, top_layers=None, train=TrainConfig(epochs=1.0, learning_rate=1e-3))
    return BenchConfig(task, anchors=AnchorConfig(num_clusters=4, mode="cluster"), fusion=FusionConfig(k=2),
                       stack=stack, stack_only=stack, bank_train=TrainConfig(epochs=1.0, learning_rate=5e-4),
                       user_lora_train=TrainConfig(epochs=3.0, learning_rate=5e-4))


def _both_fusions(c: BenchConfig, change: Callable[[FusionConfig], FusionConfig]) -> BenchConfig:
    """MTA's fusion and merge-only's alike: the shared stages that change both are scored by merge-only."""
    return replace(c, fusion=change(c.fusion), merge_only=change(c.merge_only))


def _fusion(k: int, weighting: str = "normalized", temperature: float = 0.1) -> Override:
    return lambda c: _both_fusions(c, lambda f: replace(f, k=k, weighting=weighting, temperature=temperature))


def _bank(mode: str, clusters: int, fusion: Override | None = None) -> Override:
    def apply(c: BenchConfig) -> BenchConfig:
        c = _both_fusions(replace(c, anchors=replace(c.anchors, mode=mode, num_clusters=clusters)),
                          lambda f: replace(f, k=min(f.k, clusters)))
        return fusion(c) if fusion else c
    return apply


def _stack(field: str, rank: int, epochs: float, lr: float) -> Override:
    def apply(c: BenchConfig) -> BenchConfig:
        s = getattr(c, field)
        return replace(c, **{field: replace(s, rank=rank, train=replace(s.train, epochs=epochs, learning_rate=lr))})
    return apply


def _top_layers(n: int | None, epochs: float | None = None, lr: float | None = None, field: str = "stack") -> Override:
    """The stacked LoRA `field` (mta's, or the recipe's) on the top `n` layers; epochs and lr kept unless given."""
    def apply(c: BenchConfig) -> BenchConfig:
        s = getattr(c, field)
        train = replace(s.train, epochs=epochs or s.train.epochs, learning_rate=lr or s.train.learning_rate)
        return replace(c, **{field: replace(s, top_layers=n, train=train)})
    return apply


def _lora(epochs: float, lr: float) -> Override:
    return lambda c: replace(c, user_lora_train=replace(c.user_lora_train, epochs=epochs, learning_rate=lr))


ATTENTION, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]  # the default model's


def _modules(names: list[str], rank: int) -> Override:
    return lambda c: replace(c, stack=replace(c.stack, target_modules=names, rank=rank))


def _scale(scale: float, lr_factor: float = 1.0) -> Override:
    def apply(c: BenchConfig) -> BenchConfig:
        train = replace(c.stack.train, learning_rate=c.stack.train.learning_rate * lr_factor)
        return replace(c, fusion=replace(c.fusion, scale=scale), stack=replace(c.stack, train=train))
    return apply


def _merge_only_scale(scale: float) -> Override:
    return lambda c: replace(c, merge_only=replace(c.merge_only, scale=scale))


def _bank_train(epochs: float, lr: float) -> Override:
    return lambda c: replace(c, bank_train=replace(c.bank_train, epochs=epochs, learning_rate=lr))


def _no_repeat(n: int) -> Override:
    return lambda c: replace(c, decoding=Decoding(no_repeat_ngram=n))


# stage: (the method that scores it, or several whose mean does, [(trial name, override)]); the first trial is the
# setting before tuning.
# MTA's stack gets about one full-layer epoch of compute: its training time must stay within 1/3 of the
# per-user LoRA's (3 epochs).
STAGES: dict[str, tuple[str | tuple[str, ...], list[tuple[str, Override]]]] = {
    "fusion": ("merge-only", [
        ("k2-normalized", _fusion(2)), ("k1", _fusion(1)),
        ("k2-softmax-t0.05", _fusion(2, "softmax", 0.05)), ("k2-softmax-t0.02", _fusion(2, "softmax", 0.02)),
        ("k3-normalized", _fusion(3)), ("k3-softmax-t0.05", _fusion(3, "softmax", 0.05)),
        ("k4-normalized", _fusion(4)), ("k4-softmax-t0.05", _fusion(4, "softmax", 0.05)),
    ]),
    "bank": ("merge-only", [("cluster-4", _bank("cluster", 4)), ("user-8", _bank("user", 8)),
                            ("cluster-8", _bank("cluster", 8)),  # more, finer anchors: fusing two may pay again
                            ("cluster-8-k2", _bank("cluster", 8, _fusion(2))),
                            ("cluster-8-k2-softmax-t0.02", _bank("cluster", 8, _fusion(2, "softmax", 0.02)))]),
    "mta": ("mta", [
        ("r2-lr1e-3", _stack("stack", 2, 1, 1e-3)), ("r2-lr3e-3", _stack("stack", 2, 1, 3e-3)),
        ("r2-lr1e-2", _stack("stack", 2, 1, 1e-2)), ("r1-lr3e-3", _stack("stack", 1, 1, 3e-3)),
        ("r4-lr3e-3", _stack("stack", 4, 1, 3e-3)),
    ]),
    "mta-layers": ("mta", [("all", _top_layers(None)), ("top15", _top_layers(15)), ("top8", _top_layers(8))]),
    # a top-15 step costs ~3/4 of a full one: 1.5 epochs there stay within the 1/3 time budget
    "mta-epochs": ("mta", [("ep1", _top_layers(None)), ("top15-ep1.5-lr3e-3", _top_layers(15, 1.5, 3e-3)),
                           ("top15-ep1.5-lr1e-2", _top_layers(15, 1.5, 1e-2))]),
    # the frozen bottom layers' output is cached after the first pass (training.py): a top-layer step costs ~2/3
    # of an uncached one, so more steps, or fewer and cheaper layers, fit the same budget. Timed afresh
    # against the per-user LoRA (BUDGETED): a trial over 1/3 of its training time cannot win.
    "mta-cached": ("mta", [("top15-ep1.5", _top_layers(15, 1.5, 1e-2)), ("top15-ep2", _top_layers(15, 2, 1e-2)),
                           ("top8-ep2", _top_layers(8, 2, 1e-2)), ("top8-ep3", _top_layers(8, 3, 1e-2))]),
    # training then learned bf16 matmuls (TrainConfig.mixed_precision, on where the hardware is fast; every
    # method ~2x faster) and to fold the frozen fused adapter into W while the stack trains (adapters.folded).
    # Timed afresh: fewer layers with more epochs, or a higher rate, may now fit the budget better.
    "mta-bf16": ("mta", [("top8-ep2", _top_layers(8, 2, 1e-2)), ("top8-ep2-lr2e-2", _top_layers(8, 2, 2e-2)),
                         ("top8-ep2.5", _top_layers(8, 2.5, 1e-2)), ("top8-ep3", _top_layers(8, 3, 1e-2)),
                         ("top4-ep3", _top_layers(4, 3, 1e-2)), ("top4-ep4", _top_layers(4, 4, 1e-2))]),
    "stack-only": ("stack-only", [
        ("r2-ep1-lr1e-3", _stack("stack_only", 2, 1, 1e-3)), ("r2-ep3-lr3e-3", _stack("stack_only", 2, 3, 3e-3)),
        ("r2-ep3-lr1e-2", _stack("stack_only", 2, 3, 1e-2)), ("r4-ep3-lr3e-3", _stack("stack_only", 4, 3, 3e-3)),
    ]),
    "per-user-lora": ("per-user-lora", [
        ("ep3-lr5e-4", _lora(3, 5e-4)), ("ep3-lr2e-3", _lora(3, 2e-3)), ("ep2-lr2e-3", _lora(2, 2e-3)),
    ]),
    # From here each task keeps its own winner (PER_TASK): a classification task and a generation task
    # need not share a schedule, and every method gets the same per-task care. The per-user LoRA goes
    # first: its per-task setting is the time reference of the MTA stage.
    "task-per-user-lora": ("per-user-lora", [("ep3-lr2e-3", _lora(3, 2e-3)), ("ep2-lr2e-3", _lora(2, 2e-3)),
                                             ("ep2-lr4e-3", _lora(2, 4e-3))]),
    "task-stack-only": ("stack-only", [("r2-ep3-lr1e-2", _stack("stack_only", 2, 3, 1e-2)),
                                       ("r2-ep3-lr3e-3", _stack("stack_only", 2, 3, 3e-3)),
                                       ("r2-ep2-lr2e-2", _stack("stack_only", 2, 2, 2e-2))]),
    "task-mta": ("mta", [("top8-ep2-lr2e-2", _top_layers(8, 2, 2e-2)), ("top8-ep2-lr1e-2", _top_layers(8, 2, 1e-2)),
                         ("top8-ep2-lr5e-3", _top_layers(8, 2, 5e-3)), ("top4-ep3-lr1e-2", _top_layers(4, 3, 1e-2)),
                         ("r4", lambda c: replace(c, stack=replace(c.stack, rank=4))), ("k2", _fusion(2)),
                         ("user-8", _bank("user", 8)),
                         # LaMP-4's per-user LoRA took 2 epochs, so its budget shrank to ~1.6 s: cheaper schedules
                         ("top8-ep1-lr2e-2", _top_layers(8, 1, 2e-2)), ("top4-ep2-lr2e-2", _top_layers(4, 2, 2e-2)),
                         ("top4-ep4-lr1e-2", _top_layers(4, 4, 1e-2)), ("top8-ep1-lr1e-2", _top_layers(8, 1, 1e-2)),
                         ("top8-ep1-lr5e-3", _top_layers(8, 1, 5e-3))]),
    # the recipe's rank-4 stack had ridden on MTA's schedule; from here it is tuned on its own, per task, and
    # without MTA's time budget (its first trial is the schedule it had before)
    "task-recipe": ("recipe", [(name, _top_layers(n, epochs, lr, "recipe_stack")) for name, n, epochs, lr in [
        ("top8-ep2-lr2e-2", 8, 2, 2e-2), ("top8-ep2-lr1e-2", 8, 2, 1e-2), ("top8-ep1-lr5e-3", 8, 1, 5e-3),
        ("top4-ep3-lr1e-2", 4, 3, 1e-2), ("all-ep2-lr5e-3", None, 2, 5e-3)]]),
    # the anchors had kept the schedule set before tuning (1 epoch at 5e-4: final losses ~2 on LaMP-2, ~3.5 on
    # LaMP-4), far gentler than the per-user LoRA's on the same kind of data. Offline work, outside MTA's
    # per-user budget: the bank's cost is its build time within the benchmark's 60 minutes.
    "task-bank": ("mta", [("ep1-lr5e-4", _bank_train(1, 5e-4)), ("ep1-lr2e-3", _bank_train(1, 2e-3)),
                          ("ep2-lr2e-3", _bank_train(2, 2e-3)), ("ep3-lr2e-3", _bank_train(3, 2e-3))]),
    # which modules of the top layers the stack adapts (q_proj, v_proj until now): beyond the cached bottom
    # layers a LoRA on the MLP as well costs little more time; rank 1 keeps the bytes per user well under 1/20
    "task-mta-modules": ("mta", [("qv-r2", lambda c: c), ("mlp-r1", _modules(MLP, 1)), ("all-r1", _modules(ATTENTION + MLP, 1))]),
    # how the bank's users are grouped, per task, now that each task trains its anchors its own way: in cluster
    # mode every bank user's history trains some anchor, so the build costs the same for any number of clusters
    "task-anchors": ("mta", [("cluster-8", lambda c: c), ("cluster-4", _bank("cluster", 4)),
                             ("cluster-16", _bank("cluster", 16)), ("cluster-16-k2", _bank("cluster", 16, _fusion(2))),
                             ("user-8", _bank("user", 8))]),
    # how much of the fused adapter a user starts from (its weights sum to the scale): the recipe, whose factor
    # averaging weakens its fused ΔW, beat MTA on LaMP-4 with a stronger stack; perhaps a weaker start, not averaging, helps
    "task-fusion-scale": ("mta", [("s1", lambda c: c), ("s0.75", _scale(0.75)), ("s0.5", _scale(0.5)),
                                  ("s0.5-lr2x", _scale(0.5, 2.0))]),
    # the same care for merge-only, which now has a fusion of its own
    "task-merge-only-scale": ("merge-only", [("s1", lambda c: c), ("s0.75", _merge_only_scale(0.75)),
                                             ("s0.5", _merge_only_scale(0.5))]),
    # decoding, which every method shares and so every method scores (their mean): near the base model mta and the
    # recipe wrote some LaMP-4 headlines as loops ("The Unyielding Ken Barringer: The Unyielding Ken Barringer: ...")
    "task-decoding": (tuple(METHODS), [("off", lambda c: c), ("no-repeat-3", _no_repeat(3)),
                                       ("no-repeat-4", _no_repeat(4))]),
}


def tuning_users(task_id: str, data: Path, eval_fraction: float, n: int, holdout: int,
                 seed: int = 0) -> tuple[list[User], list[User]]:
    """(tuning-bank users, tuning users): both from the benchmark's bank users, never its eval users."""
    task = get_task(task_id)
    bank_users, _ = split_users(load_users(data, task), eval_fraction, seed)
    picked = set(random.Random(seed + 1).sample(range(len(bank_users)), n))
    tune = hold_out_items(task, [u for i, u in enumerate(bank_users) if i in picked], holdout)
    return [u for i, u in enumerate(bank_users) if i not in picked], tune


BUDGETED = {"mta-cached", "mta-bf16", "task-mta", "task-mta-modules"}
PER_TASK = {"task-per-user-lora", "task-stack-only", "task-mta", "task-recipe", "task-bank", "task-mta-modules",
            "task-anchors", "task-fusion-scale", "task-merge-only-scale", "task-decoding"}


# the settings that shape a trained adapter, and those each method's result depends on: a later stage may change
# the others without invalidating it
TRAINED = {"anchors", "fusion", "merge_only", "stack", "stack_only", "bank_train", "lora", "user_lora_train", "recipe_stack"}
USES = {
    "base": set(),
    "rag": set(),
    "per-user-lora": {"lora", "user_lora_train"},
    "merge-only": {"anchors", "bank_train", "lora", "merge_only"},
    "stack-only": {"stack_only"},
    "recipe": {"anchors", "bank_train", "lora", "recipe_stack"},
    "mta": {"anchors", "bank_train", "lora", "fusion", "stack"},
}
UNUSED = {m: TRAINED - used for m, used in USES.items()}


def _same(saved, now, default) -> bool:
    """Equal settings; a field missing from `saved` was added to the code later: it ran with the field's default."""
    if isinstance(now, dict):
        return isinstance(saved, dict) and all(_same(saved[k], v, default[k]) if k in saved else v == default[k]
                                               for k, v in now.items())
    return saved == now


def _plain(cfg: BenchConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def run_trial(cfg: BenchConfig, method: str, bank_users: list[User], tune_users: list[User], out: Path,
              banks: Path, cached_only: bool = False, timed: bool = False) -> dict:
    """`timed`: reuse only this trial's own result, not an equal one run earlier (perhaps by slower code)."""
    cfg = replace(cfg, methods=[method])
    settings = {k: v for k, v in _plain(cfg).items() if k not in UNUSED[method]}
    default = _plain(BenchConfig(cfg.task, methods=[method]))
    others = [] if timed else sorted(out.parent.parent.glob("*/*/results.json"))
    for done in [out / "results.json", *others]:  # the same trial, run before
        if done.exists() and _same((r := json.loads(done.read_text()))["config"]["bench"], settings, default):
            return r
    if cached_only:
        raise SystemExit(f"{out}: not run yet (--cached-only)")
    bank_dir = None
    if METHODS[method].needs_bank:  # named by what shapes the bank: trials with the same one share it
        t = cfg.bank_train
        bank_dir = banks / f"{cfg.anchors.mode}-{cfg.anchors.num_clusters}-ep{t.epochs:g}-lr{t.learning_rate:g}"
    if bank_dir is not None and not (bank_dir / "manifest.json").exists():
        model, tokenizer = load_base(cfg.base_model)
        build_bank(bank_users, bank_dir, cfg.bank_config(), model, tokenizer, load_embedder(cfg.embedding_model))
    return run_bench(cfg, bank_users, tune_users, out, bank_dir, {"tuning": True}, progress=False)


def _fold(cfgs: dict[str, BenchConfig], trials: list[tuple[str, Override]], stage: dict) -> dict[str, BenchConfig]:
    """Each task's settings with the stage's winner for it (one shared winner, or one per task) applied."""
    w = stage["winner"]
    return {t: dict(trials)[w[t] if isinstance(w, dict) else w](c) for t, c in cfgs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tune")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--holdout", type=int, default=2)
    p.add_argument("--report", default=str(ROOT / "benchmarks" / "results" / "tuning"))
    p.add_argument("--cached-only", action="store_true", help="rewrite the report from finished trials, run nothing")
    a = p.parse_args()
    out, report_json = Path(a.out), Path(a.report + ".json")
    saved = json.loads(report_json.read_text())["stages"] if report_json.exists() else {}
    splits = {t: tuning_users(t, f, frac, n, a.holdout) for t, f, frac, n in TASKS}
    cfgs = {t: before_tuning(t) for t, *_ in TASKS}  # each stage's winner is folded in before the next stage
    report: dict = {"holdout": a.holdout, "tuning_users": {t: [u.user_id for u in s[1]] for t, s in splits.items()},
                    "stages": {}}
    for stage, (method, trials) in STAGES.items():
        if stage not in a.stages:
            if stage in saved:  # not rerun: its saved winner still shapes the stages after it
                report["stages"][stage] = saved[stage]
                cfgs = _fold(cfgs, trials, saved[stage])
            continue
        scores: dict[str, dict[str, dict]] = {}
        timed = stage in BUDGETED
        if timed:  # the reference: the per-user LoRA's current setting, timed by the same code
            trials = [("_per-user-lora", lambda c: c), *trials]
        for name, override in trials:
            for task, (bank_users, tune_users) in splits.items():
                cfg = override(cfgs[task])
                by = ["per-user-lora"] if name == "_per-user-lora" else [method] if isinstance(method, str) else method
                per_method = {}
                for m in by:
                    start = time.perf_counter()
                    folder = out / task / stage / (name if len(by) == 1 else f"{name}-{m}")
                    r = run_trial(cfg, m, bank_users, tune_users, folder, out / task / "banks", a.cached_only, timed)
                    per_method[m] = {**r["methods"][m], "main": r["methods"][m][r["main_metric"]]}
                    print(f"[{stage}] {task} {name} {m}: {r['main_metric']}={per_method[m]['main']:.4f} train "
                          f"{per_method[m]['train_seconds_per_user']:.1f} s/user ({time.perf_counter() - start:.0f} s)", flush=True)
                if len(by) == 1:
                    scores.setdefault(name, {})[task] = per_method[by[0]]
                else:  # scored by the methods' mean; their train time is the sum
                    scores.setdefault(name, {})[task] = {
                        "main": sum(v["main"] for v in per_method.values()) / len(by),
                        "train_seconds_per_user": sum(v["train_seconds_per_user"] for v in per_method.values()),
                        "methods": {m: v["main"] for m, v in per_method.items()}}
        reference = scores.pop("_per-user-lora", None)
        best_of = {t: max(s[t]["main"] for s in scores.values()) or 1.0 for t in splits}
        combined = {n: sum(s[t]["main"] / best_of[t] for t in splits) / len(splits) for n, s in scores.items()}
        within = {n: {t: reference is None or s[t]["train_seconds_per_user"] <= reference[t]["train_seconds_per_user"] / 3
                      for t in splits} for n, s in scores.items()}
        rank = list(combined).index
        if stage in PER_TASK:
            winner = {t: max(scores, key=lambda n: (within[n][t], scores[n][t]["main"], -rank(n))) for t in splits}
        else:
            winner = max(combined, key=lambda n: (all(within[n].values()), combined[n], -rank(n)))
        report["stages"][stage] = {"method": method, "winner": winner, "combined": combined, "trials": scores}
        cfgs = _fold(cfgs, trials, report["stages"][stage])
        if reference is not None:
            report["stages"][stage].update(budget={t: reference[t]["train_seconds_per_user"] / 3 for t in splits},
                                           within_budget=within)
        print(f"[{stage}] winner: {winner}", flush=True)
        report["settings"] = {t: dataclasses.asdict(c) for t, c in cfgs.items()}
        atomic_write_json(report_json, report)
        atomic_write_bytes(Path(a.report + ".md"), markdown(report).encode())


def markdown(report: dict) -> str:
    tasks = list(report["tuning_users"])
    lines = ["# Tuning sweep (benchmarks/tune.py)", "",
             f"Tuning users (drawn from the benchmark's bank users; eval users never seen): "
             + "; ".join(f"{t}: {len(ids)}" for t, ids in report["tuning_users"].items())
             + f". Each answers its query plus its last {report['holdout']} profile items (removed from its profile).", ""]
    for stage, s in report["stages"].items():
        w = s["winner"]
        won = ", ".join(f"{t}: **{n}**" for t, n in w.items()) if isinstance(w, dict) else f"**{w}**"
        by = s["method"] if isinstance(s["method"], str) else "the mean of " + ", ".join(s["method"])
        lines += [f"## {stage} (scored by {by}; winner {won})", "",
                  "| trial | " + " | ".join(f"{t} main | {t} train s/user" for t in tasks) + " | combined |",
                  "|---|" + "---|---|" * len(tasks) + "---|"]
        listed = [n for n, _ in STAGES[stage][1]] if stage in STAGES else []
        for name, per_task in sorted(s["trials"].items(), key=lambda kv: listed.index(kv[0]) if kv[0] in listed else len(listed)):
            within = s.get("within_budget", {}).get(name, True)  # saved by older runs as one flag per trial
            over = {t: not (within[t] if isinstance(within, dict) else within) for t in tasks}
            cells = [f"{per_task[t]['main']:.4f} | {per_task[t]['train_seconds_per_user']:.1f}{' (over)' if over[t] else ''}"
                     for t in tasks]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['combined'][name]:.3f} |")
        if not isinstance(s["method"], str):
            lines += ["", "| trial | task | " + " | ".join(s["method"]) + " |", "|---|---|" + "---|" * len(s["method"])]
            lines += [f"| {name} | {t} | " + " | ".join(f"{per_task[t]['methods'][m]:.4f}" for m in s["method"]) + " |"
                      for name, per_task in s["trials"].items() for t in tasks]
        if "budget" in s:
            lines.append("\nBudget: 1/3 of the per-user LoRA's train s/user, timed in this stage: "
                         + ", ".join(f"{t} {v:.1f} s" for t, v in s["budget"].items()) + "; (over): over it.")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
