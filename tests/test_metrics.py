import math

import pytest

from mta.metrics import (
    LAMP1_LABELS,
    LAMP2_LABELS,
    LOWER_IS_BETTER,
    MAIN_METRIC,
    METRICS,
    classification_metrics,
    evaluate,
    generation_metrics,
    rating_metrics,
)


@pytest.mark.parametrize(
    "predictions, golds, labels, accuracy",
    [
        # " comedy " strips to a hit, "Comedy" is off-label (case matters), "drama" is off-label:
        # hits 1 + 0 + 1 + 0 = 2 of 4.
        ([" comedy ", "Comedy", "action", "drama"], ["comedy", "comedy", "action", "romance"],
         LAMP2_LABELS, 0.5),
        # "1" is not "[1]": hits 1 + 0 + 0 = 1 of 3.
        (["[1]", "[1]", "1"], ["[1]", "[2]", "[1]"], LAMP1_LABELS, 1 / 3),
        (["[2]"], [" [2]\n"], LAMP1_LABELS, 1.0),
    ],
)
def test_classification_accuracy(predictions, golds, labels, accuracy):
    assert classification_metrics(predictions, golds, labels)["accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize(
    "predictions, golds, f1",
    [
        # a: TP 1, FP 0, FN 1 -> P 1, R 1/2, F1 2/3
        # b: TP 1, FP 1, FN 0 -> P 1/2, R 1, F1 2/3
        # c: TP 0 (predicted "x", off-label) -> F1 0
        # macro = (2/3 + 2/3 + 0) / 3 = 4/9
        (["a", "b", "b", "x"], ["a", "a", "b", "c"], 4 / 9),
        # a, b perfect (F1 1 each); c has no support and no prediction -> 0: macro 2/3
        (["a", "b"], ["a", "b"], 2 / 3),
        # every class perfect
        (["a", "b", "c"], ["a", "b", "c"], 1.0),
        # off-label outputs are never right: all three classes score 0
        (["?", "?", "?"], ["a", "b", "c"], 0.0),
    ],
)
def test_classification_macro_f1(predictions, golds, f1):
    assert classification_metrics(predictions, golds, ["a", "b", "c"])["f1"] == pytest.approx(f1)


def test_classification_f1_is_warning_free(recwarn):
    classification_metrics(["a"], ["a"], ["a", "b"])
    assert not [w for w in recwarn if "ill-defined" in str(w.message)]


@pytest.mark.parametrize(
    "prediction, gold, counted_as",
    [
        ("five", "2", 5.0),  # |1-2| = 1 <= |5-2| = 3 -> worst is 5
        ("", "4", 1.0),  # |1-4| = 3 > |5-4| = 1 -> worst is 1
        ("3 stars", "3", 5.0),  # tie |1-3| = |5-3| -> 5
        (" 3.5 ", "4", 3.5),  # parses after strip
    ],
)
def test_rating_unparsable_counts_as_worst(prediction, gold, counted_as):
    assert rating_metrics([prediction], [gold])["mae"] == pytest.approx(abs(float(gold) - counted_as))


def test_rating_mae_rmse_by_hand():
    # errors: "five" vs 2 -> 5 vs 2 = 3; 4 vs 4 = 0; 1 vs 3 = 2
    # MAE = 5/3, RMSE = sqrt((9 + 0 + 4) / 3) = sqrt(13/3)
    result = rating_metrics(["five", "4", "1"], ["2", "4", "3"])
    assert result["mae"] == pytest.approx(5 / 3)
    assert result["rmse"] == pytest.approx(math.sqrt(13 / 3))


@pytest.mark.parametrize(
    "prediction, gold, rouge1, rougeL",
    [
        # unigrams: 2 shared, P 2/3, R 1 -> F 2 * (2/3) / (5/3) = 0.8; the LCS is also 2 words
        ("the cat sat", "the cat", 0.8, 0.8),
        ("the cat", "the cat", 1.0, 1.0),
        # the tokenizer lowercases and drops punctuation; strip() removes the padding
        ("  The Cat! ", "the cat", 1.0, 1.0),
        # same unigrams, reversed: LCS is 1 word of 2 -> P = R = F = 1/2
        ("cat the", "the cat", 1.0, 0.5),
        ("dog", "the cat", 0.0, 0.0),
    ],
)
def test_generation_single_pair(prediction, gold, rouge1, rougeL):
    result = generation_metrics([prediction], [gold])
    assert result["rouge1"] == pytest.approx(rouge1)
    assert result["rougeL"] == pytest.approx(rougeL)


def test_generation_is_mean_over_examples():
    # (0.8 + 1.0 + 0.0) / 3 = 0.6
    result = generation_metrics(["the cat sat", "a dog", "x"], ["the cat", "a dog", "y"])
    assert result["rouge1"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    "task_id, predictions, golds, expected",
    [
        ("LaMP-1", ["[1]", "[2]"], ["[1]", "[1]"], {"accuracy": 0.5}),
        ("LaMP-2", ["comedy", "romance"], ["comedy", "action"], {"accuracy": 0.5}),
        ("LaMP-3", ["five", "4"], ["2", "4"], {"mae": 1.5}),  # errors 3 and 0
        ("LaMP-4", ["the cat sat"], ["the cat"], {"rouge1": 0.8}),
        ("LaMP-5", ["the cat"], ["the cat"], {"rougeL": 1.0}),
        ("LaMP-7", ["dog"], ["the cat"], {"rouge1": 0.0}),
    ],
)
def test_evaluate_dispatches_by_task(task_id, predictions, golds, expected):
    result = evaluate(task_id, predictions, golds)
    assert MAIN_METRIC[task_id] in result
    for key, value in expected.items():
        assert result[key] == pytest.approx(value)


def test_registry_and_main_metric_cover_the_same_tasks():
    assert set(METRICS) == set(MAIN_METRIC) == {"LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7"}
    assert {m for m in MAIN_METRIC.values() if m in LOWER_IS_BETTER} == {"mae"}


@pytest.mark.parametrize(
    "task_id, predictions, golds, message",
    [
        ("LaMP-6", ["a"], ["a"], r"unknown LaMP task 'LaMP-6'; known tasks: LaMP-1, LaMP-2"),
        ("LaMP-2", ["comedy"], ["comedy", "action"], r"1 predictions but 2 golds"),
        ("LaMP-4", [], [], r"no predictions"),
    ],
)
def test_evaluate_rejects_bad_input(task_id, predictions, golds, message):
    with pytest.raises(ValueError, match=message):
        evaluate(task_id, predictions, golds)
