"""LaMP evaluation metrics, reproducing the official LaMP ``eval/evaluation.py`` semantics.

The official code goes through HF ``evaluate``, which needs the hub; the same numbers come from
scikit-learn and rouge-score directly, so results stay comparable with published LaMP tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error

LAMP1_LABELS = ["[1]", "[2]"]
LAMP2_LABELS = [
    "sci-fi",
    "based on a book",
    "comedy",
    "action",
    "twist ending",
    "dystopia",
    "dark comedy",
    "classic",
    "psychology",
    "fantasy",
    "romance",
    "thought-provoking",
    "social commentary",
    "violence",
    "true story",
]
LAMP3_LABELS = ["1", "2", "3", "4", "5"]

MAIN_METRIC = {
    "LaMP-1": "accuracy",
    "LaMP-2": "accuracy",
    "LaMP-3": "mae",
    "LaMP-4": "rouge1",
    "LaMP-5": "rouge1",
    "LaMP-7": "rouge1",
}
LOWER_IS_BETTER = {"mae", "rmse"}


def classification_metrics(
    predictions: list[str], golds: list[str], labels: list[str]
) -> dict[str, float]:
    """Accuracy and macro-F1 where any output that is not exactly a label counts as wrong.

    Off-label outputs map to -1, which is outside ``labels`` passed to the F1, so they only cost
    recall of their gold class, as in the official code; labels without support score 0.
    """
    index = {label: i for i, label in enumerate(labels)}
    preds = [index.get(p.strip(), -1) for p in predictions]
    refs = [index.get(g.strip(), -1) for g in golds]
    return {
        "accuracy": float(accuracy_score(refs, preds)),
        "f1": float(
            f1_score(
                refs, preds, labels=list(range(len(labels))), average="macro", zero_division=0
            )
        ),
    }


def _worst_rating(gold: float) -> float:
    """An unparsable rating is charged the farthest end of the 1-5 scale, as LaMP does."""
    return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


def _parse_rating(prediction: str, gold: float) -> float:
    try:
        return float(prediction.strip())
    except ValueError:
        return _worst_rating(gold)


def rating_metrics(predictions: list[str], golds: list[str]) -> dict[str, float]:
    """MAE and RMSE for LaMP-3 ratings; unparsable outputs are penalised, never dropped."""
    refs = [float(g.strip()) for g in golds]
    preds = [_parse_rating(p, y) for p, y in zip(predictions, refs)]
    return {
        "mae": float(mean_absolute_error(refs, preds)),
        "rmse": math.sqrt(float(mean_squared_error(refs, preds))),
    }


_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def generation_metrics(predictions: list[str], golds: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 / ROUGE-L F-measure, without stemming (HF ``evaluate``'s rouge default).

    HF ``evaluate`` aggregates with a bootstrap whose midpoint estimates this plain mean; the exact
    mean is used so that results are deterministic.
    """
    scores = [_ROUGE.score(g.strip(), p.strip()) for p, g in zip(predictions, golds)]
    return {
        key: sum(s[key].fmeasure for s in scores) / len(scores) for key in ("rouge1", "rougeL")
    }


METRICS: dict[str, Callable[[list[str], list[str]], dict[str, float]]] = {
    "LaMP-1": partial(classification_metrics, labels=LAMP1_LABELS),
    "LaMP-2": partial(classification_metrics, labels=LAMP2_LABELS),
    "LaMP-3": rating_metrics,
    "LaMP-4": generation_metrics,
    "LaMP-5": generation_metrics,
    "LaMP-7": generation_metrics,
}


def evaluate(task_id: str, predictions: list[str], golds: list[str]) -> dict[str, float]:
    """Score predictions for a LaMP task, refusing inputs that would silently yield a wrong number."""
    if task_id not in METRICS:
        raise ValueError(f"unknown LaMP task {task_id!r}; known tasks: {', '.join(METRICS)}")
    if len(predictions) != len(golds):
        raise ValueError(
            f"{len(predictions)} predictions but {len(golds)} golds for {task_id}; "
            "they must pair one to one"
        )
    if not predictions:
        raise ValueError(f"no predictions to evaluate for {task_id}")
    return METRICS[task_id](list(predictions), list(golds))
