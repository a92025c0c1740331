"""`mta bench` end to end on the tiny model: 9 bank users, 3 eval users, all seven methods."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mta import bench
from mta.bench import METHODS, Run, results_markdown, split_users, user_interval, versus
from mta.cli import main
from mta.config import BenchConfig, FusionConfig
from mta.data.lamp import Query, User, load_users
from mta.io import MTAError
from mta.tasks import get_task

FAST = ["--num-clusters", "3", "--bank-epochs", "1", "--lora-epochs", "1", "--stack-epochs", "1", "--stack-only-epochs", "1",
        "--recipe-stack-epochs", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, movie_data, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("bench") / "run"
    assert main(["bench", "--task", "LaMP-2", "--data", str(movie_data), "--eval-fraction", "0.25", "--out", str(out),
                 "--model", str(tiny_model_dir), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def results(run) -> dict:
    return json.loads((run / "results.json").read_text())


def test_results_schema(results):
    assert results["task"] == "LaMP-2" and results["main_metric"] == "accuracy"
    assert (results["n_eval_users"], results["n_bank_users"]) == (3, 9)
    assert set(results["methods"]) == set(METHODS)
    unseen = {"accuracy_unseen"} if results["n_eval_answers_in_bank"] < results["n_eval_answers"] else set()
    for m in results["methods"].values():
        assert set(m) == {"accuracy", "accuracy_ci95", "f1", "train_seconds_per_user", "infer_seconds_per_user",
                          "bytes_per_user"} | unseen
        assert 0 <= m["accuracy"] <= 1 and m["infer_seconds_per_user"] > 0
    assert results["fusion_ms_per_user"] > 0 and results["bank_build_seconds"] > 0
    assert set(results["mta_versus"]) == set(METHODS) - {"mta"}
    for name, v in results["mta_versus"].items():
        assert v["diff"] == pytest.approx(results["methods"]["mta"]["accuracy"] - results["methods"][name]["accuracy"])
        assert -1 <= v["ci95"][0] <= v["diff"] <= v["ci95"][1] <= 1
    assert results["config"]["bank"]["anchors"]["num_clusters"] == 3
    bench = results["config"]["bench"]  # --stack-*, --stack-only-* and --recipe-stack-* reach their own stacked LoRAs
    assert bench["stack"]["train"]["epochs"] == bench["stack_only"]["train"]["epochs"] == bench["recipe_stack"]["train"]["epochs"] == 1
    assert (bench["stack"]["top_layers"], bench["stack_only"]["top_layers"]) == (8, None)  # the defaults, unmixed
    assert (bench["stack"]["rank"], bench["recipe_stack"]["rank"]) == (2, 4)
    assert results["config"]["split"]["eval_fraction"] == 0.25


def test_report_files(run):
    table = (run / "results.md").read_text()
    assert all(f"| {name} |" in table for name in METHODS)
    assert "| method | accuracy [95% CI] | mta − it |" in table and "mta − it is paired" in table
    assert (run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_are_lamp_files_that_mta_eval_scores_alike(run, results, capsys):
    eval_users = load_users(run / "eval_users.json")
    ids = sorted(q.id for u in eval_users for q in u.queries)
    for name in METHODS:
        preds = json.loads((run / "predictions" / f"{name}.json").read_text())
        assert preds["task"] == "LaMP_2" and sorted(p["id"] for p in preds["golds"]) == ids
        capsys.readouterr()
        assert main(["eval", "--task", "LaMP-2", "--predictions", str(run / "predictions" / f"{name}.json"),
                     "--data", str(run / "eval_users.json")]) == 0
        assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["methods"][name]["accuracy"], abs=1e-4)


def test_bank_never_sees_eval_users(run, results, movie_data):
    bank_ids = {u.user_id for u in load_users(run / "bank_users.json")}
    eval_ids = {u.user_id for u in load_users(run / "eval_users.json")}
    assert not bank_ids & eval_ids and bank_ids | eval_ids == {u.user_id for u in load_users(movie_data)}
    assert eval_ids == set(results["config"]["split"]["eval_user_ids"])
    manifest = json.loads((run / "bank" / "manifest.json").read_text())
    trained_on = {uid for a in manifest["anchors"] for uid in a["user_ids"]}
    assert trained_on and trained_on <= bank_ids


def test_bytes_per_user(results):
    b = {name: m["bytes_per_user"] for name, m in results["methods"].items()}
    assert b["base"] == b["rag"] == 0
    assert 0 < b["merge-only"] < 2000 < b["mta"] < b["recipe"] < b["per-user-lora"]
    assert 0 < b["mta"] - b["stack-only"] < 1000  # the same stacked LoRA; mta's record adds its fusion


def test_reuse_bank_from_the_written_split(run, results, tmp_path, tiny_model_dir):
    out = tmp_path / "again"
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(run / "bank_users.json"), "--eval-users",
                 str(run / "eval_users.json"), "--out", str(out), "--model", str(tiny_model_dir), "--reuse-bank",
                 str(run / "bank"), "--methods", "merge-only", "mta", "--limit-users", "2", *FAST]) == 0
    again = json.loads((out / "results.json").read_text())
    assert not (out / "bank").exists()
    assert again["bank_build_seconds"] == results["bank_build_seconds"]  # the bank's cost, read from its manifest
    assert again["config"]["bank_fingerprint"] == results["config"]["bank_fingerprint"]
    assert set(again["methods"]) == {"merge-only", "mta"} and again["n_eval_users"] == 2
    # the same bank gives the same fused adapter: merge-only answers the first two users as before
    first = {p["id"]: p["output"] for p in json.loads((run / "predictions" / "merge-only.json").read_text())["golds"]}
    for p in json.loads((out / "predictions" / "merge-only.json").read_text())["golds"]:
        assert p["output"] == first[p["id"]]


def test_refuses_a_bank_that_saw_eval_users(run, tmp_path, tiny_model_dir, capsys):
    # the roles swapped: the reused bank was trained on what are now the eval users
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(run / "eval_users.json"), "--eval-users",
                 str(run / "bank_users.json"), "--out", str(tmp_path / "x"), "--model", str(tiny_model_dir),
                 "--reuse-bank", str(run / "bank"), "--methods", "mta"]) == 2
    assert "bank must never see an eval user" in capsys.readouterr().err


def test_bank_without_shared_refuses_a_reused_bank_trained_on_a_left_out_user(monkeypatch, run, tmp_path,
                                                                             tiny_model_dir, capsys):
    monkeypatch.setattr(bench, "without_shared_items", lambda task, bank_users, eval_users: bank_users[1:])
    args = ["bench", "--task", "LaMP-2", "--bank-users", str(run / "bank_users.json"), "--eval-users",
            str(run / "eval_users.json"), "--model", str(tiny_model_dir), "--reuse-bank", str(run / "bank"),
            "--methods", "mta", "--bank-without-shared"]
    assert main([*args, "--out", str(tmp_path / "x")]) == 2
    first = load_users(run / "bank_users.json", get_task("LaMP-2"))[0].user_id
    assert f"trained on bank user(s) ['{first}']" in capsys.readouterr().err and not (tmp_path / "x" / "results.json").exists()


def test_refuses_overlapping_user_files(movie_data, tmp_path, capsys):
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(movie_data), "--eval-users", str(movie_data),
                 "--out", str(tmp_path / "x")]) == 2
    assert "bank must never see an eval user" in capsys.readouterr().err


def test_split_is_seeded_and_disjoint(movie_data):
    users = load_users(movie_data, get_task("LaMP-2"))
    bank, held = split_users(users, 1 / 3, seed=0)
    assert len(held) == 4 and len(bank) == 8 and not {u.user_id for u in bank} & {u.user_id for u in held}
    assert [u.user_id for u in split_users(users, 1 / 3, seed=0)[1]] == [u.user_id for u in held]
    assert [u.user_id for u in split_users(users, 1 / 3, seed=1)[1]] != [u.user_id for u in held]


def test_merge_only_fuses_with_its_own_settings(monkeypatch, tmp_path):
    """A task may start MTA's stack from a scaled fusion; merge-only keeps the fusion tuned for it."""
    seen = {}

    def personalize(bank, user, cfg, *args, **kwargs):
        seen[cfg.stack is None] = cfg
        raise StopIteration

    monkeypatch.setattr(bench, "personalize", personalize)
    cfg = BenchConfig("LaMP-4", fusion=FusionConfig(scale=0.5), merge_only=FusionConfig(k=2))
    run = Run(cfg, get_task("LaMP-4"), None, None, object(), False)
    for name in ["mta", "merge-only"]:
        with pytest.raises(StopIteration):
            METHODS[name].adapt(run, None, User("u", [], []), tmp_path)
    assert seen[False].fusion == FusionConfig(scale=0.5) and seen[True].fusion == FusionConfig(k=2)


def test_decoding_reaches_every_method(run, tmp_path, tiny_model_dir):
    """--no-repeat-ngram is decoding, which the methods share: the tiny model's looping answers change."""
    out = tmp_path / "no-repeat"
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(run / "bank_users.json"), "--eval-users",
                 str(run / "eval_users.json"), "--out", str(out), "--model", str(tiny_model_dir), "--methods", "base", "rag",
                 "--no-repeat-ngram", "2"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["bench"]["decoding"] == {"no_repeat_ngram": 2}
    for name in ["base", "rag"]:
        before, after = (json.loads((d / "predictions" / f"{name}.json").read_text())["golds"] for d in (run, out))
        assert [p["id"] for p in before] == [p["id"] for p in after] and before != after


def test_history_split_keeps_n_items_and_asks_every_other(movie_data):
    task = get_task("LaMP-2")
    users = load_users(movie_data, task)
    by_size = {n: bench.history_split(task, users, n, seed=0) for n in (1, 3, 5)}
    for n, split in by_size.items():
        for u, s in zip(users, split):
            assert len(s.profile) == n and len(s.queries) == len(u.profile) - n + 1 and s.queries[-1] == u.queries[-1]
            kept = [u.profile.index(it) for it in s.profile]
            assert kept == sorted(kept)  # profile order kept
            held = s.queries[:-1]
            assert [q.id for q in held] == [f"{u.user_id}-p{i}" for i in range(len(u.profile)) if i not in kept]
            assert all(q == Query(q.id, *task.item_pair(u.profile[int(q.id.rsplit("-p", 1)[1])])) for q in held)
            # no item is both personalized from and scored
            assert not {task.item_pair(it)[0] for it in s.profile} & {q.input for q in held}
    for small, large in ((1, 3), (3, 5)):  # nested: a smaller size's items among a larger size's
        assert all(all(it in b.profile for it in a.profile) for a, b in zip(by_size[small], by_size[large]))
    assert bench.history_split(task, users, 3, seed=0) == by_size[3]
    assert bench.history_split(task, users, 3, seed=1) != by_size[3]
    with pytest.raises(MTAError, match="below every eval user's profile length"):
        bench.history_split(task, users, len(users[0].profile), seed=0)


def test_bank_subsets_are_nested_and_keep_file_order(movie_data):
    users = load_users(movie_data, get_task("LaMP-2"))
    subsets = bench.bank_subsets(users, [0.25, 0.5, 1.0], seed=0)
    assert [len(s) for s in subsets.values()] == [3, 6, 12] and subsets[1.0] == users
    assert all(u in subsets[0.5] for u in subsets[0.25])
    assert all([users.index(u) for u in s] == sorted(users.index(u) for u in s) for s in subsets.values())


@pytest.fixture(scope="module")
def curves(run, tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("curves") / "run"
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(run / "bank_users.json"), "--eval-users",
                 str(run / "eval_users.json"), "--out", str(out), "--model", str(tiny_model_dir), "--methods", "base", "rag",
                 "per-user-lora", "merge-only", "mta", "--history-sizes", "2,4", "--bank-fractions", "0.5,1",
                 "--reuse-bank", str(run / "bank"), *FAST]) == 0
    return out


def test_history_sizes_and_bank_fractions_schema(curves):
    r = json.loads((curves / "results.json").read_text())
    methods = ["base", "rag", "per-user-lora", "merge-only", "mta"]
    assert set(r["methods"]) == set(methods) and r["n_eval_answers"] == 3  # LaMP's own protocol, as before
    assert set(r["history_sizes"]) == {"2", "4"}
    for n, block in r["history_sizes"].items():
        assert block["n_answers"] == 3 * (6 - int(n) + 1)
        assert set(block["methods"]) == set(methods) and set(block["versus"]) == set(methods) - {"mta"}
        for name, m in block["methods"].items():
            lo, hi = m["accuracy_ci95"]
            assert lo <= m["accuracy"] <= hi and m["infer_seconds_per_user"] >= 0
        for name, (d, lo, hi) in block["versus"].items():
            assert d == pytest.approx(block["methods"]["mta"]["accuracy"] - block["methods"][name]["accuracy"])
            assert lo <= d <= hi
    fr = r["bank_fractions"]
    assert (fr["0.5"]["n_bank_users"], fr["1"]["n_bank_users"]) == (4, 9)
    assert all(b["history_size"] == 2 and set(b["methods"]) == set(methods) for b in fr.values())
    assert fr["1"]["methods"] == r["history_sizes"]["2"]["methods"]  # the whole bank: the n = 2 run itself
    for name in ("base", "rag", "per-user-lora"):  # without a bank: run once
        assert fr["0.5"]["methods"][name] == fr["1"]["methods"][name]
    manifest = json.loads((curves / "bank-f0.5" / "manifest.json").read_text())
    bank_ids = set(r["config"]["split"]["bank_user_ids"])
    assert {uid for a in manifest["anchors"] for uid in a["user_ids"]} <= bank_ids
    assert set(r["seconds"]["conditions"]) == {"full", "h2", "h4", "f0.5"} and r["seconds"]["fraction_banks"]["0.5"] > 0
    md = (curves / "results.md").read_text()
    assert "n = 2 (15 answers)" in md and "4 bank users" in md and "Where the time went" in md
    assert (curves / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_read_back_from_results_json_keeps_its_order(curves):
    r = json.loads((curves / "results.json").read_text())  # written with sorted keys
    assert results_markdown(r) == (curves / "results.md").read_text()  # methods in METHODS' order, as in the run
    r["history_sizes"]["10"] = r["history_sizes"].pop("4")  # as a string "10" sorts before "2"
    md = results_markdown(json.loads(json.dumps(r, sort_keys=True)))
    assert md.index("n = 2 (") < md.index("n = 10 (")


def test_every_method_answers_the_same_items_from_the_same_profile(curves):
    for n in (2, 4):
        asked = load_users(curves / f"h{n}" / "eval_users.json", get_task("LaMP-2"))
        ids = sorted(q.id for u in asked for q in u.queries)
        for name in ["base", "rag", "per-user-lora", "merge-only", "mta"]:
            preds = json.loads((curves / f"h{n}" / "predictions" / f"{name}.json").read_text())
            assert sorted(p["id"] for p in preds["golds"]) == ids
        for u in asked:
            for name in ["merge-only", "mta"]:  # what a personalized user stores is the profile it was personalized from
                assert json.loads((curves / f"h{n}" / "users" / name / u.user_id / "profile.json").read_text()) == u.profile


def test_history_size_predictions_score_alike_with_mta_eval(curves, capsys):
    r = json.loads((curves / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--task", "LaMP-2", "--predictions", str(curves / "h4" / "predictions" / "mta.json"),
                 "--data", str(curves / "h4" / "eval_users.json")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(r["history_sizes"]["4"]["methods"]["mta"]["accuracy"], abs=1e-4)


def test_total_cost_counts_the_bank_and_break_even(curves):
    r = json.loads((curves / "results.json").read_text())
    bank = r["config"]["bank_path"]
    files = [p for p in Path(bank).rglob("*") if p.is_file() and p.name in
             ("manifest.json", "anchors.safetensors", "adapter_config.json", "adapter_model.safetensors")]
    assert r["bank_bytes"] == sum(p.stat().st_size for p in files) > 0
    lora = r["methods"]["per-user-lora"]["bytes_per_user"]
    for name in ("merge-only", "mta"):
        n, b = r["break_even_users"][name], r["methods"][name]["bytes_per_user"]
        assert r["bank_bytes"] + n * b < n * lora and r["bank_bytes"] + (n - 1) * b >= (n - 1) * lora
    assert r["break_even_users"]["base"] == 1
    assert not list(curves.rglob("README.md"))  # PEFT's model card is nothing serving needs: not stored, not counted


def test_a_rerun_reads_back_what_was_answered(curves, monkeypatch, tmp_path, run, tiny_model_dir):
    before = (curves / "h2" / "predictions" / "mta.json").read_text()
    monkeypatch.setattr(bench, "generate", lambda *a, **k: pytest.fail("a finished condition was answered again"))
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(run / "bank_users.json"), "--eval-users",
                 str(run / "eval_users.json"), "--out", str(curves), "--model", str(tiny_model_dir), "--methods", "base", "rag",
                 "per-user-lora", "merge-only", "mta", "--history-sizes", "2,4", "--bank-fractions", "0.5,1",
                 "--reuse-bank", str(run / "bank"), *FAST]) == 0
    assert (curves / "h2" / "predictions" / "mta.json").read_text() == before


def test_a_rerun_with_another_mta_setting_reanswers_mta_alone(curves, tmp_path, run, tiny_model_dir):
    out = tmp_path / "again"
    shutil.copytree(curves, out)
    saved = {name: (out / "h2" / "answers" / f"{name}.json").read_text() for name in ("base", "merge-only", "mta")}
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(run / "bank_users.json"), "--eval-users",
                 str(run / "eval_users.json"), "--out", str(out), "--model", str(tiny_model_dir), "--methods", "base",
                 "merge-only", "mta", "--history-sizes", "2", "--no-full-profile", "--reuse-bank", str(run / "bank"), *FAST,
                 "--stack-lr", "0.05"]) == 0
    now = {name: (out / "h2" / "answers" / f"{name}.json").read_text() for name in saved}
    assert now["base"] == saved["base"] and now["merge-only"] == saved["merge-only"] and now["mta"] != saved["mta"]


def _script(name: str):
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent.parent / "benchmarks" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_versus_script_pairs_another_runs_answers(curves):
    """benchmarks/versus.py on a run against itself reproduces the run's own paired comparisons."""
    script = _script("versus")
    r = json.loads((curves / "results.json").read_text())
    out = script.compare(curves, "mta", curves, ["merge-only", "base"])
    assert set(out["sizes"]) == {"2", "4"}
    for n, s in out["sizes"].items():
        for m in ("merge-only", "base"):
            assert s["versus"][m] == pytest.approx(r["history_sizes"][n]["versus"][m])
        assert s["mta"][0] == pytest.approx(r["history_sizes"][n]["methods"]["mta"]["accuracy"])
    sizes = out["sizes"].values()  # all sizes pooled: every answer once, the mean weighted by answers
    assert out["all"]["n_answers"] == sum(s["n_answers"] for s in sizes)
    assert out["all"]["mta"][0] == pytest.approx(sum(s["mta"][0] * s["n_answers"] for s in sizes) / out["all"]["n_answers"])
    assert out["all"]["versus"]["base"][0] == pytest.approx(
        sum(s["versus"]["base"][0] * s["n_answers"] for s in sizes) / out["all"]["n_answers"])


def test_detectable_difference_is_the_textbook_power_calculation(curves):
    """80 % power at 95 % two-sided is 2.80 standard errors: from a bootstrap interval over users it matches
    2.80·σ/√users, and compare() gives it for every difference it reports."""
    script = _script("versus")
    users, sigma = 400, 0.5
    diffs = np.random.default_rng(0).normal(0.0, sigma, users)
    _, lo, hi = user_interval(list(diffs), list(range(users)))
    assert script.detectable([lo, hi]) == pytest.approx(2.8016 * sigma / users ** 0.5, rel=0.1)
    out = script.compare(curves, "mta", curves, ["base"])
    for s in [*out["sizes"].values(), out["all"]]:
        assert s["detectable"]["base"] == script.detectable(s["versus"]["base"][1:])  # the tiny model: 0 here
    asked = load_users(curves / "h2" / "eval_users.json", get_task("LaMP-2"))
    assert out["sizes"]["2"]["n_users"] == out["all"]["n_users"] == len(asked) > 1


def test_versus_script_reads_a_published_results_folder(curves, tmp_path):
    """Against a folder of LaMP predictions only (as benchmarks/results keeps them): the same comparison; a
    question it did not answer is a clear error."""
    script = _script("versus")
    for n in ("2", "4"):
        shutil.copytree(curves / f"h{n}" / "predictions", tmp_path / f"h{n}" / "predictions")
    assert script.compare(curves, "mta", tmp_path, ["base"]) == script.compare(curves, "mta", curves, ["base"]) | {"theirs": str(tmp_path)}
    preds = tmp_path / "h4" / "predictions" / "base.json"
    p = json.loads(preds.read_text())
    preds.write_text(json.dumps({**p, "golds": p["golds"][1:]}))
    with pytest.raises(MTAError, match="no answer to 1 of the questions asked at n = 4"):
        script.compare(curves, "mta", tmp_path, ["base"])


def test_fusion_grid_plot_reads_each_variants_comparisons(curves, tmp_path):
    """benchmarks/fusion_grid_plot.py: the default's row is the powered run's own comparisons, a variant's row its
    versus.json's, in the grid's order; a missing variant is left out; the picture is written."""
    script, parts = _script("fusion_grid_plot"), ("merge-only", "base")
    versus = _script("versus").compare(curves, "mta", curves, ["mta", *parts])
    for tag in ("lamp2", "lamp4"):
        (tmp_path / "powered" / tag).mkdir(parents=True)
        shutil.copy(curves / "results.json", tmp_path / "powered" / tag / "results.json")
        for name in ("learn-k2", "fixed-k4"):
            (tmp_path / "eval" / f"{tag}-{name}").mkdir(parents=True)
            (tmp_path / "eval" / f"{tag}-{name}" / "versus.json").write_text(json.dumps(versus))
    r = json.loads((curves / "results.json").read_text())
    rows = script.rows(tmp_path / "eval", tmp_path / "powered", "lamp2", parts)
    assert [label for label, _ in rows] == ["fixed, k = 1 (default)", "fixed, k = 4", "learned / anchor, k = 2"]
    assert rows[0][1][("mta", "all")] == [0.0, 0.0, 0.0]
    assert rows[0][1][("base", "4")] == r["history_sizes"]["4"]["versus"]["base"]
    assert rows[2][1][("mta", "all")] == versus["all"]["versus"]["mta"]
    assert rows[2][1][("merge-only", "2")] == versus["sizes"]["2"]["versus"]["merge-only"]
    script.plot(tmp_path / "eval", tmp_path / "powered", tmp_path / "grid.png", parts)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bf16_script_counts_changed_answers_against_an_exact_control(curves):
    """benchmarks/bf16_answers.py: reloading a user's fp32 stacked LoRA answers exactly as the run did."""
    script = _script("bf16_answers")
    out = script.measure(curves, "mta")
    for n, s in out["sizes"].items():
        assert s["control_changed"] == 0 and 0 <= s["changed"] <= s["n_answers"] == 3 * (6 - int(n) + 1)
        assert s["bytes_per_user"]["bf16"] < s["bytes_per_user"]["fp32"]  # half the tensors; the header is the same


def test_train_cost_script_times_the_benchs_own_adapt(run):
    """benchmarks/train_cost.py: MTA and the per-user LoRA per user at each size, the first user untimed, their ratio
    the ratio of the summed seconds, inside its interval; nothing left behind but the figures. Other `mta bench` options
    pass through (here: weights learned per user)."""
    out = _script("train_cost").measure("LaMP-2", str(run / "bank"), str(run / "bank_users.json"), [2, 4], limit=2,
                                        bench_args=["--fusion-adapt", "learn"])
    assert out["fusion"]["k"] == 1 and out["user_lora_train"]["epochs"] == 3.0  # the task's tuned settings
    assert out["fusion"]["adapt"] == "learn" and out["bench_args"] == ["--fusion-adapt", "learn"]
    for s in out["sizes"].values():
        mta, lora = s["seconds"]["mta"], s["seconds"]["per-user-lora"]
        assert s["users"] == len(mta) == len(lora) == 2 and min(mta + lora) > 0
        assert s["ratio"] == pytest.approx(sum(mta) / sum(lora)) and s["ratio_interval"][0] <= s["ratio"] <= s["ratio_interval"][1]


def test_combine_script_joins_a_run_split_across_two_folders(curves):
    """A run's conditions written by two invocations (full, n = 2 and the bank-size curve in one; n = 4 in the other)
    combine into the run's own report; parts that are not one experiment, or ask a condition twice, are refused."""
    combine = _script("combine_curves").combine
    r = json.loads((curves / "results.json").read_text())
    a, b = json.loads(json.dumps(r)), json.loads(json.dumps(r))
    del a["history_sizes"]["4"], a["seconds"]["conditions"]["h4"]
    a["config"]["bench"]["history_sizes"] = [2]
    for k in ("methods", "mta_versus", "n_eval_answers", "n_eval_answers_in_bank", "bank_fractions"):
        del b[k]
    b["history_sizes"] = {"4": r["history_sizes"]["4"]}
    b["seconds"].update(conditions={"h4": r["seconds"]["conditions"]["h4"]}, fraction_banks={}, total=1.0)
    b["config"]["bench"].update(history_sizes=[4], bank_fractions=[], full_profile=False)
    both = combine([b, a])
    for k in ("methods", "mta_versus", "history_sizes", "bank_fractions", "break_even_users"):
        assert both[k] == r[k]
    assert both["seconds"]["conditions"] == r["seconds"]["conditions"]
    assert both["seconds"]["total"] == r["seconds"]["total"] + 1.0
    assert both["config"]["bench"] == r["config"]["bench"] and len(both["config"]["parts"]) == 2
    assert results_markdown(both).split("Seconds of training")[0] == results_markdown(r).split("Seconds of training")[0]
    with pytest.raises(MTAError, match="h2 ran in more than one"):
        combine([a, r])
    b["config"]["bench"]["stack"]["rank"] += 1
    with pytest.raises(MTAError, match="not one experiment"):
        combine([a, b])


def test_ratio_interval_resamples_rows_and_is_a_point_when_they_are_alike():
    lo, hi = bench.ratio_interval([1.0, 2.0, 3.0, 5.0], [4.0, 4.0, 5.0, 6.0])
    assert lo < 11 / 19 < hi
    assert bench.ratio_interval([2.0], [4.0]) == (0.5, 0.5) and bench.ratio_interval([1.0, 2.0], [2.0, 4.0]) == (0.5, 0.5)
    values, users = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0], ["a", "a", "b", "b", "c", "c"]  # per user: 1/2, 2/2, 0/2
    assert bench.user_interval(values, users)[1:] == bench.ratio_interval([1.0, 2.0, 0.0], [2.0, 2.0, 2.0])


def test_verdict_reads_the_interval():
    assert bench.verdict([0.1, 0.02, 0.2], "accuracy") == "better" and bench.verdict([0.1, -0.02, 0.2], "rouge1") == "level"
    assert bench.verdict([-0.1, -0.2, -0.01], "accuracy") == "worse"
    assert bench.verdict([-0.3, -0.5, -0.1], "mae") == "better"  # lower is better


def test_in_bank_histories_flags_answers_whose_item_a_bank_user_holds():
    task = get_task("LaMP-4")
    article = "Fighting for Mariupol has continued to be intense, even as the offensive floundered elsewhere."
    bank = [User("b", [{"text": "An unrelated article about gardening in the spring, with tips.", "title": "t"},
                       {"text": article + " More text follows here.", "title": "Ukraine Rejects Surrender"}], [])]
    asks = [Query("e1", f"Generate a headline for the following article: {article}  More   text follows here.", "g"),
            Query("e2", "Generate a headline for the following article: something else entirely, long enough.", "g")]
    eval_users = [User("e", [{"text": "short", "title": "x"}], asks)]
    assert bench.in_bank_histories(task, bank, eval_users) == [True, False]  # whitespace aside, the same article
    assert bench.in_bank_histories(task, [User("b", [{"text": "short", "title": "t"}], [])], eval_users) == [False, False]


def _article(text: str) -> dict:
    """A LaMP-4 profile item long enough to identify (bench._item_keys)."""
    return {"text": text + " " + "words " * 10, "title": "t"}


def test_without_shared_items_drops_the_bank_users_who_hold_an_eval_users_item():
    task = get_task("LaMP-4")
    eval_users = [User("e", [_article("The eval user's own article")], [Query("e1", "Generate a headline: the asked article " + "words " * 10, "g")])]
    bank = [User("holds-profile", [_article("The eval user's own article")], []), User("holds-query", [_article("the asked article")], []),
            User("clean", [_article("Something else altogether")], [])]
    assert [u.user_id for u in bench.without_shared_items(task, bank, eval_users)] == ["clean"]
    cfg = bench_config(["bench", "--task", "LaMP-4", "--out", "o", "--bank-without-shared"])
    assert cfg.bank_without_shared and not bench_config(["bench", "--task", "LaMP-4", "--out", "o"]).bank_without_shared


def test_linked_groups_joins_users_who_share_an_item_even_through_others():
    task = get_task("LaMP-4")
    asks = lambda text: [Query("q", "Generate a headline for the following article: " + text + " " + "words " * 10, "g")]
    users = [User("a", [_article("first article")], []), User("lone", [_article("an article nobody else holds")], []),
             User("b", [_article("first article"), _article("second article")], []), User("c", [_article("second article")], []),
             User("asks", [_article("own article")], asks("third article")), User("holds", [_article("third article")], [])]
    groups = [[u.user_id for u in g] for g in bench.linked_groups(task, users)]
    assert groups == [["a", "b", "c"], ["lone"], ["asks", "holds"]]
    assert bench.linked_groups(task, []) == []


def bench_config(args: list[str]) -> BenchConfig:
    from mta import cli
    return cli._bench_config(cli.build_parser().parse_args(args), "LaMP-4")


def test_unseen_scores_the_answers_no_bank_history_holds(monkeypatch, run, results, tmp_path, tiny_model_dir):
    eval_users = load_users(run / "eval_users.json", get_task("LaMP-2"))
    flags = [i % 2 == 0 for i in range(sum(len(u.queries) for u in eval_users))]
    monkeypatch.setattr(bench, "in_bank_histories", lambda task, b, e: flags)
    out = tmp_path / "unseen"
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(run / "bank_users.json"), "--eval-users",
                 str(run / "eval_users.json"), "--out", str(out), "--model", str(tiny_model_dir), "--methods", "base", "mta",
                 "--reuse-bank", str(run / "bank"), *FAST]) == 0
    r = json.loads((out / "results.json").read_text())
    golds = [q.gold for u in eval_users for q in u.queries]
    for name in ("base", "mta"):
        outputs = [p["output"] for p in json.loads((out / "predictions" / f"{name}.json").read_text())["golds"]]
        kept = [(o, g) for o, g, f in zip(outputs, golds, flags) if not f]
        want = sum(o == g for o, g in kept) / len(kept)
        assert r["methods"][name]["accuracy_unseen"] == pytest.approx(want)
    assert r["n_eval_answers_in_bank"] == sum(flags) and "accuracy_unseen scores the others" in (out / "results.md").read_text()


def test_versus_is_a_paired_bootstrap_of_the_main_metric():
    task = get_task("LaMP-2")
    golds = ["comedy", "sci-fi", "comedy", "romance"] * 4
    wrong = ["action"] * 16
    assert versus(task, golds, golds, golds) == {"diff": 0.0, "ci95": [0.0, 0.0]}  # paired: equal answers, no spread
    assert versus(task, golds, wrong, golds) == {"diff": 1.0, "ci95": [1.0, 1.0]}
    v = versus(task, golds[:8] + wrong[:8], golds, golds)
    assert v["diff"] == -0.5 and -1 <= v["ci95"][0] < -0.5 < v["ci95"][1] <= 0
    assert versus(task, golds[:8] + wrong[:8], golds, golds) == v  # seeded
    rouge = versus(get_task("LaMP-4"), ["a red fox", "blue sky"], ["a red dog", "grey sky"], ["a red fox", "blue sky today"])
    assert rouge["diff"] > 0 and rouge["ci95"][0] <= rouge["diff"] <= rouge["ci95"][1]


def test_versus_resamples_a_users_answers_together():
    """4 users x 4 answers, each user all right or all wrong: 4 independent outcomes, not 16."""
    task, golds = get_task("LaMP-2"), ["comedy"] * 16
    ours = ["comedy"] * 8 + ["action"] * 8
    users = [u for u in "abcd" for _ in range(4)]
    by_query, by_user = versus(task, ours, golds, golds), versus(task, ours, golds, golds, users)
    assert by_query["diff"] == by_user["diff"] == -0.5
    assert by_user["ci95"][0] < by_query["ci95"][0] and by_query["ci95"][1] < by_user["ci95"][1]
    assert versus(task, ours, golds, golds, list(range(16))) == by_query  # one answer per user: as by query
