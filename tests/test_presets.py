"""Per-task tuned settings: they name real settings, change only what they list, and yield to flags."""

import dataclasses
import json
from pathlib import Path

import pytest

from mta import cli, presets
from mta.config import BankConfig, BenchConfig, Decoding, FusionConfig, PersonalizeConfig, StackConfig
from mta.tasks import get_task


def _leaves(d: dict, prefix=()):
    for k, v in d.items():
        yield from _leaves(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)]


def _at(config, path):
    for k in path:
        config = getattr(config, k)
    return config


@pytest.mark.parametrize("task_id", list(presets.TASK_PRESETS))
def test_shipped_presets_name_real_settings(task_id):
    assert get_task(task_id).id == task_id
    tuned = presets.preset(BenchConfig(task_id), task_id)  # an unknown name or nesting raises here
    for path, value in _leaves(presets.TASK_PRESETS[task_id]):
        assert _at(tuned, path) == value


def _recorded(got, saved):
    """`got` cut down to the fields `saved` records: a setting added to the code after a sweep has no tuned value."""
    return {k: _recorded(got[k], v) for k, v in saved.items()} if isinstance(saved, dict) else got


def test_presets_are_what_tuning_found():
    """Every tuned setting in benchmarks/results/tuning.json, default or preset, is what a task gets."""
    report = json.loads((Path(__file__).parent.parent / "benchmarks" / "results" / "tuning.json").read_text())
    for task_id, settings in report["settings"].items():
        got = dataclasses.asdict(presets.preset(BenchConfig(task_id), task_id))
        assert _recorded(got, settings) == settings


@pytest.fixture
def lamp4_preset(monkeypatch):
    monkeypatch.setattr(presets, "TASK_PRESETS", {"LaMP-4": {"stack": {"rank": 4, "train": {"learning_rate": 1e-2}},
                                                             "user_lora_train": {"epochs": 2.0},
                                                             "bank_train": {"epochs": 5.0}}})


def test_preset_changes_only_what_it_lists(lamp4_preset):
    d = BenchConfig("LaMP-4")
    tuned = presets.preset(d, "LaMP-4")
    assert (tuned.stack.rank, tuned.stack.train.learning_rate, tuned.user_lora_train.epochs) == (4, 1e-2, 2.0)
    assert tuned.stack.train.epochs == d.stack.train.epochs and tuned.fusion == d.fusion and tuned.stack_only == d.stack_only
    assert d.stack == StackConfig()  # the default it started from is untouched
    assert presets.preset(BenchConfig("LaMP-2"), "LaMP-2") == BenchConfig("LaMP-2")  # no preset: the defaults


def test_preset_of_other_configs(lamp4_preset):
    assert presets.preset(StackConfig(), "LaMP-4", "stack") == presets.preset(BenchConfig("LaMP-4"), "LaMP-4").stack
    p = presets.preset(PersonalizeConfig(), "LaMP-4")  # shares `stack` and `fusion` with BenchConfig, not the rest
    assert p.stack.rank == 4 and p.fusion == PersonalizeConfig().fusion
    b = presets.preset(BankConfig("LaMP-4"), "LaMP-4")  # BenchConfig's bank_train is BankConfig's train
    assert b.train == presets.preset(BenchConfig("LaMP-4"), "LaMP-4").bank_train and b.train.epochs == 5.0
    assert b.train.learning_rate == BankConfig("LaMP-4").train.learning_rate and b.anchors == BankConfig("LaMP-4").anchors


def test_unset_flags_take_the_preset_given_ones_win(lamp4_preset):
    parse = cli.build_parser().parse_args
    a = parse(["personalize", "--bank", "b", "--user-data", __file__, "--out", "o", "--epochs", "3"])
    s = cli._stack_config(a, "LaMP-4")
    assert (s.rank, s.train.learning_rate, s.train.epochs) == (4, 1e-2, 3.0)
    assert cli._stack_config(a, "LaMP-2") == dataclasses.replace(StackConfig(), train=dataclasses.replace(StackConfig().train, epochs=3.0))
    a = parse(["personalize", "--bank", "b", "--user-data", __file__, "--out", "o", "--stack-rank", "1", "--lr", "5e-3",
               "--stack-modules", "up_proj", "down_proj"])
    s = cli._stack_config(a, "LaMP-4")
    assert (s.rank, s.train.learning_rate, s.target_modules) == (1, 5e-3, ["up_proj", "down_proj"])


def test_fusion_preset_is_mtas_merge_only_keeps_its_own(monkeypatch):
    monkeypatch.setattr(presets, "TASK_PRESETS", {"LaMP-4": {"fusion": {"scale": 0.5}}})
    parse = cli.build_parser().parse_args
    cfg = cli._bench_config(parse(["bench", "--task", "LaMP-4", "--out", "o"]), "LaMP-4")
    assert (cfg.fusion, cfg.merge_only) == (FusionConfig(scale=0.5), FusionConfig())
    cfg = cli._bench_config(parse(["bench", "--task", "LaMP-4", "--out", "o", "--fusion-scale", "0.8", "--k", "2"]), "LaMP-4")
    assert cfg.fusion == cfg.merge_only == FusionConfig(k=2, scale=0.8)  # flags reach both
    personalize = ["personalize", "--bank", "b", "--user-data", __file__, "--out", "o"]
    assert cli._fusion_config(parse(personalize), "LaMP-4", 8).scale == 0.5
    assert cli._fusion_config(parse(personalize + ["--no-stack"]), "LaMP-4", 8, "merge_only") == FusionConfig()


def test_a_tuned_k_fuses_at_most_the_banks_anchors_a_given_one_is_exact(monkeypatch):
    monkeypatch.setattr(presets, "TASK_PRESETS", {"LaMP-4": {"fusion": {"k": 4}}})
    parse = cli.build_parser().parse_args
    personalize = ["personalize", "--bank", "b", "--user-data", __file__, "--out", "o"]
    assert [cli._fusion_config(parse(personalize), "LaMP-4", n).k for n in (2, 4, 8)] == [2, 4, 4]
    assert cli._fusion_config(parse(personalize + ["--k", "3"]), "LaMP-4", 2).k == 3  # plan_fusion refuses it, plainly
    bench = ["bench", "--task", "LaMP-4", "--out", "o"]
    assert cli._bench_config(parse(bench + ["--num-clusters", "2"]), "LaMP-4").fusion.k == 2
    assert cli._bench_config(parse(bench), "LaMP-4").fusion.k == 4


def test_bank_build_flags_over_the_preset(lamp4_preset):
    parse = cli.build_parser().parse_args
    a = parse(["bank", "build", "--task", "LaMP-4", "--data", __file__, "--out", "o"])
    assert cli._bank_config(a, "LaMP-4").train.epochs == 5.0 and cli._bank_config(a, "LaMP-2") == BankConfig("LaMP-2")
    a = parse(["bank", "build", "--task", "LaMP-4", "--data", __file__, "--out", "o", "--epochs", "1", "--num-clusters", "5"])
    c = cli._bank_config(a, "LaMP-4")
    assert (c.train.epochs, c.train.learning_rate, c.anchors.num_clusters) == (1.0, BankConfig("LaMP-4").train.learning_rate, 5)


def test_bench_flags_over_the_preset(lamp4_preset):
    parse = cli.build_parser().parse_args
    cfg = cli._bench_config(parse(["bench", "--task", "LaMP-4", "--out", "o", "--stack-only-lr", "3e-3"]), "LaMP-4")
    assert cfg == dataclasses.replace(presets.preset(BenchConfig("LaMP-4"), "LaMP-4"), stack_only=dataclasses.replace(
        BenchConfig("LaMP-4").stack_only, train=dataclasses.replace(BenchConfig("LaMP-4").stack_only.train, learning_rate=3e-3)))
    cfg = cli._bench_config(parse(["bench", "--task", "LaMP-4", "--out", "o", "--lora-epochs", "1"]), "LaMP-4")
    assert cfg.user_lora_train.epochs == 1.0 and cfg.stack.rank == 4
    cfg = cli._bench_config(parse(["bench", "--task", "LaMP-4", "--out", "o", "--stack-modules", "q_proj"]), "LaMP-4")
    assert cfg.stack.target_modules == ["q_proj"] and cfg.stack.rank == 4 and cfg.recipe_stack.target_modules is None


def test_decoding_preset_reaches_bench_and_generate_flags_win(monkeypatch):
    monkeypatch.setattr(presets, "TASK_PRESETS", {"LaMP-4": {"decoding": {"no_repeat_ngram": 3}}})
    parse = cli.build_parser().parse_args
    a = parse(["bench", "--task", "LaMP-4", "--out", "o"])
    assert cli._bench_config(a, "LaMP-4").decoding == Decoding(3) and cli._bench_config(a, "LaMP-2").decoding == Decoding()
    a = parse(["bench", "--task", "LaMP-4", "--out", "o", "--no-repeat-ngram", "0"])
    assert cli._bench_config(a, "LaMP-4").decoding == Decoding()
    assert cli._decoding(parse(["generate", "--user", "u"]), "LaMP-4") == Decoding(3)
    assert cli._decoding(parse(["serve", "--bank", "b", "--store", "s", "--no-repeat-ngram", "4"]), "LaMP-4") == Decoding(4)
