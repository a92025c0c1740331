"""`mta bench` end to end on the tiny model: 9 bank users, 3 eval users, all seven methods."""

import json
from pathlib import Path

import pytest

from mta import bench
from mta.bench import METHODS, Run, hold_out_items, split_users, versus
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
        assert set(m) == {"accuracy", "f1", "train_seconds_per_user", "infer_seconds_per_user", "bytes_per_user"} | unseen
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
    assert "mta − it, accuracy [95% CI]" in table and "paired bootstrap" in table
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
    assert b["stack-only"] == pytest.approx(b["mta"], rel=0.05)


def test_reuse_bank_from_the_written_split(run, results, tmp_path, tiny_model_dir):
    out = tmp_path / "again"
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(run / "bank_users.json"), "--eval-users",
                 str(run / "eval_users.json"), "--out", str(out), "--model", str(tiny_model_dir), "--reuse-bank",
                 str(run / "bank"), "--methods", "merge-only", "mta", "--limit-users", "2", *FAST]) == 0
    again = json.loads((out / "results.json").read_text())
    assert not (out / "bank").exists() and again["bank_build_seconds"] is None
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


def test_hold_out_items_scores_the_last_profile_items(movie_data, run, tmp_path, tiny_model_dir):
    task = get_task("LaMP-2")
    user = load_users(movie_data, task)[0]
    held = hold_out_items(task, [user], 2)[0]
    assert held.profile == user.profile[:-2] and held.queries[2:] == user.queries
    assert held.queries[:2] == [Query(f"{user.user_id}-p{j}", *task.item_pair(it)) for j, it in enumerate(user.profile[-2:])]
    assert hold_out_items(task, [user], 0) == [user]
    with pytest.raises(MTAError, match="must keep at least one"):
        hold_out_items(task, [user], len(user.profile))
    with pytest.raises(MTAError, match="give 0 or more"):
        hold_out_items(task, [user], -1)
    out = tmp_path / "holdout"
    assert main(["bench", "--task", "LaMP-2", "--bank-users", str(run / "bank_users.json"), "--eval-users",
                 str(run / "eval_users.json"), "--out", str(out), "--model", str(tiny_model_dir), "--methods", "base", "mta",
                 "--reuse-bank", str(run / "bank"), "--eval-holdout", "2", *FAST]) == 0
    r = json.loads((out / "results.json").read_text())
    assert (r["n_eval_users"], r["n_eval_answers"]) == (3, 9) and "(9 answers)" in (out / "results.md").read_text()
    assert sum("-p" in p["id"] for p in json.loads((out / "predictions" / "mta.json").read_text())["golds"]) == 6


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
