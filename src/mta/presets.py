"""Per-task tuned settings: what `benchmarks/tune.py` found best for one task on its own tuning users.

The dataclass defaults (StackConfig, FusionConfig, ...) are the settings that did best across both shared
tasks. A classification task and a generation task need not share a schedule, so the per-task stages of
the sweep (benchmarks/results/tuning.md) may change some of them for one task; those changes live here and
nowhere else. Keys name BenchConfig's fields, so one table serves `mta bench` (every method, baselines
included) and the library's own configs (`stack`, `fusion`, `anchors`) alike. They were tuned on the
default model; other models start from them too.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

T = TypeVar("T")

# The per-task stages' winners (benchmarks/results/tuning.md, "task-*").
TASK_PRESETS: dict[str, dict] = {
    "LaMP-4": {
        # scored on all 40 bank users in folds whose banks hold none of their answers' items (the apart-* stages):
        # the fused adapter at half strength, for mta and merge-only alike (full strength had won while fold banks
        # held 45 of the 120 answers' items)
        # mta fuses its 4 nearest anchors with similarity weights (hs-fusion, AVX512-BF16 machine: above the fixed
        # nearest anchor, +0.025 [+0.011, +0.041] ROUGE-1, and above weights learned per user from 2 anchors, the
        # preset before it, +0.010 [+0.003, +0.018], training faster than that; on LaMP-2 it scored lower)
        "fusion": {"scale": 0.5, "adapt": "fixed", "k": 4},
        "merge_only": {"scale": 0.5},
        # over it a gentle stack on q/v of the top 8 layers (the default model's names); harder ones scored lower
        "stack": {"train": {"learning_rate": 5e-3}, "target_modules": ["q_proj", "v_proj"]},
        # every method's decoding: nearer the base model some headlines looped ("X: X: X: ...")
        "decoding": {"no_repeat_ngram": 3},
    },
}


# BenchConfig's fields that another config names otherwise
RENAMED = {"BankConfig": {"bank_train": "train"}}


def preset(config: T, task_id: str, field: str | None = None) -> T:
    """`config` with the task's tuned changes to those of its fields that BenchConfig shares (a BenchConfig,
    PersonalizeConfig or BankConfig: `fusion`, `stack`, `anchors`, ...), or to one BenchConfig `field`."""
    changes = TASK_PRESETS.get(task_id, {})
    if field is not None:
        return _changed(config, changes.get(field, {}))
    renamed = RENAMED.get(type(config).__name__, {})
    names = {f.name for f in dataclasses.fields(config)}
    changes = {renamed.get(k, k): v for k, v in changes.items()}
    return _changed(config, {k: v for k, v in changes.items() if k in names})


def _changed(obj, changes: dict):
    return dataclasses.replace(obj, **{k: _changed(getattr(obj, k), v) if isinstance(v, dict) else v
                                       for k, v in changes.items()})
