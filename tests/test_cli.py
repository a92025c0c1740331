"""`mta` end to end on the tiny model, and exit code 2 with a clear message on bad input."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mta.bank import Bank
from mta import presets
from mta.cli import _quiet_hf, build_parser, main, serve_spec
from mta.config import AnchorConfig, BankConfig, FusionConfig, LoraSpec, ServeConfig, TrainConfig
from mta.io import MTAError
from mta.generation import generate
from mta.models import load_base
from mta.stacking import load_personalized, load_profile
from mta.tasks import get_task, query_prompt

FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "128", "--device", "cpu"]
QUESTION = get_task("LaMP-2").item_pair({"description": "A rookie cop battles armed mercenaries in a skyscraper.", "tag": ""})[0]


def _run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir, movie_data):
    """bank build → personalize three users (exact+stack on the top layer, recipe+stack, svd without stack), once per module."""
    root = tmp_path_factory.mktemp("cli")
    steps = {}
    steps["build"] = _run("bank", "build", "--task", "movie_tagging", "--data", movie_data, "--out", root / "bank",
                          "--model", tiny_model_dir, "--num-clusters", "3", "--rank", "4", *FAST)
    for uid, extra in [("0", ["--k", "2", "--stack-top-layers", "1"]), ("5", ["--merge", "recipe", "--stack-rank", "1"]),
                       ("6", ["--no-stack", "--merge", "svd", "--svd-rank", "2", "--k", "3"])]:
        steps[uid] = _run("personalize", "--bank", root / "bank", "--user-data", movie_data, "--user-id", uid,
                          "--out", root / "users" / uid, *extra, *FAST)
    return root, steps


def test_bank_build(pipeline):
    root, steps = pipeline
    rc, out, err = steps["build"]
    assert rc == 0, err
    bank = Bank.load(root / "bank")
    assert out.strip() == f"bank {root / 'bank'}: 3 anchors {bank.anchor_ids}, fingerprint {bank.fingerprint}"
    assert bank.manifest["task"] == "LaMP-2" and bank.config.lora.rank == 4 and bank.config.train.epochs == 1


def test_bank_info(pipeline):
    root, _ = pipeline
    rc, out, _ = _run("bank", "info", root / "bank")
    assert rc == 0
    bank = Bank.load(root / "bank")
    assert out.startswith(f"task LaMP-2  base {bank.manifest['base_model']}")
    assert all(f"  {a}: users" in out for a in bank.anchor_ids)


@pytest.mark.parametrize("uid, anchors, merge, stacked", [("0", 2, "exact", True), ("5", 2, "recipe", True), ("6", 3, "svd", False)])
def test_personalize(pipeline, uid, anchors, merge, stacked):
    root, steps = pipeline
    rc, out, err = steps[uid]
    assert rc == 0, err
    folder = root / "users" / uid
    record = json.loads((folder / "user.json").read_text())
    assert record["user_id"] == uid and record["fusion"]["merge"] == merge
    assert len(record["fusion"]["anchor_ids"]) == anchors
    assert (folder / "adapter" / "adapter_model.safetensors").exists() == stacked
    assert out.splitlines()[0].startswith(f"user {uid}: anchors {record['fusion']['anchor_ids']}")
    assert ("fusion record only" in out) == (not stacked)


def test_generate_one_input_matches_the_library(pipeline, tiny_model_dir):
    root, _ = pipeline
    rc, out, err = _run("generate", "--bank", root / "bank", "--user", root / "users" / "0", "--input", QUESTION,
                        "--max-new-tokens", "5", "--device", "cpu")
    assert rc == 0, err
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    model, _ = load_personalized(Bank.load(root / "bank"), root / "users" / "0", model)
    prompt = query_prompt(get_task("LaMP-2"), QUESTION, load_profile(root / "users" / "0"))
    assert out == generate(model, tok, [prompt], 5)[0] + "\n"


@pytest.fixture(scope="module")
def predictions(pipeline, movie_data):
    root, _ = pipeline
    result = _run("generate", "--bank", root / "bank", "--user", root / "users", "--data", movie_data,
                  "--out", root / "preds.json", "--device", "cpu")
    return root / "preds.json", result


def test_generate_batch_writes_lamp_predictions(predictions, movie_data):
    path, (rc, out, err) = predictions
    assert rc == 0, err
    assert out.strip() == f"wrote 3 predictions to {path}"
    preds = json.loads(path.read_text())
    want = {q["id"] for u in json.loads(movie_data.read_text()) if str(u["user_id"]) in {"0", "5", "6"} for q in u["query"]}
    assert preds["task"] == "LaMP_2" and {g["id"] for g in preds["golds"]} == want  # LaMP's evaluator's spelling
    assert all(isinstance(g["output"], str) for g in preds["golds"])


def test_eval_prints_metrics(predictions, movie_data):
    path, _ = predictions
    rc, out, err = _run("eval", "--task", "2", "--predictions", path, "--data", movie_data, "--partial")  # 3 users of 12
    assert rc == 0, err
    scores = json.loads(out)
    assert scores["task"] == "LaMP-2" and scores["n"] == 3
    assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["f1"] <= 1


def test_eval_of_perfect_predictions(tmp_path, movie_data):
    golds = [{"id": q["id"], "output": q["gold"]} for u in json.loads(movie_data.read_text()) for q in u["query"]]
    (tmp_path / "p.json").write_text(json.dumps({"task": "LaMP-2", "golds": golds}))
    rc, out, _ = _run("eval", "--task", "LaMP-2", "--predictions", tmp_path / "p.json", "--data", movie_data)
    assert rc == 0 and json.loads(out)["n"] == 12 and json.loads(out)["accuracy"] == 1.0


def test_eval_refuses_predictions_that_answer_only_some_queries(capsys, tmp_path, movie_data):
    golds = [{"id": q["id"], "output": q["gold"]} for u in json.loads(movie_data.read_text()) for q in u["query"]]
    (tmp_path / "p.json").write_text(json.dumps({"task": "LaMP_2", "golds": golds[:1]}))
    argv = ["eval", "--task", "LaMP-2", "--predictions", tmp_path / "p.json", "--data", movie_data]
    _fails(capsys, argv, f"the predictions answer 1 of the 12 queries with a gold in {movie_data}: 11 are missing, e.g. "
                         f"{sorted(g['id'] for g in golds[1:])[:3]}; pass --partial to score only the answered ones")
    rc, out, _ = _run(*argv, "--partial")
    assert rc == 0 and json.loads(out)["n"] == 1 and json.loads(out)["accuracy"] == 1.0


def test_eval_against_data_without_golds(capsys, tmp_path, movie_data):
    data = [{**u, "query": [{**q, "gold": None} for q in u["query"]]} for u in json.loads(movie_data.read_text())]
    (tmp_path / "d.json").write_text(json.dumps(data))
    (tmp_path / "p.json").write_text(json.dumps({"task": "LaMP_2", "golds": [{"id": data[0]["query"][0]["id"], "output": "x"}]}))
    _fails(capsys, ["eval", "--task", "LaMP-2", "--predictions", tmp_path / "p.json", "--data", tmp_path / "d.json"],
           "holds no gold answers to score against")


# -- bad input: exit code 2, one clear line on stderr, nothing written -----------------------------------------------

def _fails(capsys, argv, message):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2
    assert re.match(r"mta( [a-z]+)*: error: ", err) and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    return err


def _build(data, out, model, *extra):
    return ["bank", "build", "--task", "LaMP-2", "--data", data, "--out", out, "--model", model, "--num-clusters", "3",
            "--rank", "4", *extra, *FAST]


@pytest.mark.parametrize("name, content, message", [
    ("users.json", '[{"user_id": 1, "profile": [}]', "is not valid JSON (line 1"),
    ("users.json", json.dumps([{"user_id": 1}]), "user #0: missing field(s) ['profile']"),
    ("users.json", json.dumps([{"user_id": 1, "profile": [{"description": "d"}]}]), "lacks field(s) ['tag'] required by LaMP-2"),
    ("dev_questions.json", '[{"id": "1", "input": "q", "profile": []', "is not valid JSON"),
    ("dev_questions.json", json.dumps([{"id": "1", "profile": []}]), "question #0: missing field(s) ['input']"),
], ids=["per-user-json", "per-user-field", "per-user-item", "official-json", "official-field"])
def test_bank_build_bad_data(capsys, tmp_path, tiny_model_dir, name, content, message):
    (tmp_path / name).write_text(content)
    _fails(capsys, _build(tmp_path / name, tmp_path / "bank", tiny_model_dir), message)
    assert not (tmp_path / "bank").exists()


def test_bank_build_bad_outputs_file(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "dev_questions.json").write_text(json.dumps([{"id": "1", "input": "q", "profile": []}]))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"golds": [{"id": "1"}]}))
    _fails(capsys, _build(tmp_path / "dev_questions.json", tmp_path / "bank", tiny_model_dir), "gold #0: missing field(s) ['output']")
    assert not (tmp_path / "bank").exists()


def test_bank_build_unknown_task(capsys, tmp_path, movie_data, tiny_model_dir):
    argv = _build(movie_data, tmp_path / "bank", tiny_model_dir)
    argv[argv.index("LaMP-2")] = "LaMP-9"
    _fails(capsys, argv, "unknown task 'LaMP-9'; known tasks: LaMP-1 (citation)")
    assert not (tmp_path / "bank").exists()


def test_bank_build_missing_model(capsys, tmp_path, movie_data):
    _fails(capsys, _build(movie_data, tmp_path / "bank", tmp_path / "no-model"), "cannot load model")
    assert not (tmp_path / "bank").exists()


def test_bank_build_with_other_settings_is_refused(capsys, pipeline, tmp_path, movie_data, tiny_model_dir):
    root, _ = pipeline
    shutil.copytree(root / "bank", tmp_path / "bank")
    (tmp_path / "bank" / "manifest.json").unlink()
    before = snapshot(tmp_path / "bank")
    argv = _build(movie_data, tmp_path / "bank", tiny_model_dir)
    argv[argv.index("--rank") + 1] = "8"
    _fails(capsys, argv, "holds a bank started with other settings or data; use another --out or delete it")
    assert snapshot(tmp_path / "bank") == before


def _personalize(bank, data, uid, out, *extra):
    return ["personalize", "--bank", bank, "--user-data", data, "--user-id", uid, "--out", out, *extra, *FAST]


def test_personalize_unknown_user(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    _fails(capsys, _personalize(root / "bank", movie_data, "999", tmp_path / "u"), "unknown user '999': not among the 12 users")
    assert not (tmp_path / "u").exists()


def test_personalize_empty_profile(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    data = json.loads(movie_data.read_text()) + [{"user_id": "new", "profile": [], "query": []}]
    (tmp_path / "users.json").write_text(json.dumps(data))
    _fails(capsys, _personalize(root / "bank", tmp_path / "users.json", "new", tmp_path / "u"),
           "user 'new' has an empty profile: there is no history to personalize from")
    assert not (tmp_path / "u").exists()


def test_personalize_k_larger_than_the_bank(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    _fails(capsys, _personalize(root / "bank", movie_data, "1", tmp_path / "u", "--k", "4"),
           "k=4 is out of range: the bank has 3 anchor(s)")
    assert not (tmp_path / "u").exists()


def test_a_tuned_k_above_the_banks_size_fuses_all_its_anchors(monkeypatch, pipeline, tmp_path, movie_data):
    """LaMP-4's tuned k = 4 on a smaller bank: personalize and serve fuse every anchor it has, as they would any k."""
    monkeypatch.setitem(presets.TASK_PRESETS, "LaMP-2", {"fusion": {"k": 4}})
    root, _ = pipeline
    rc, _, err = _run(*_personalize(root / "bank", movie_data, "1", tmp_path / "u", "--stack-top-layers", "1"))
    assert rc == 0, err
    assert len(json.loads((tmp_path / "u" / "user.json").read_text())["fusion"]["anchor_ids"]) == 3
    assert serve_spec(build_parser().parse_args(["serve", "--bank", str(root / "bank"), "--store", "s"])).cfg.fusion.k == 3


def test_personalize_with_weights_that_are_not_finite(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    _fails(capsys, _personalize(root / "bank", movie_data, "1", tmp_path / "u", "--k", "2", "--weighting", "softmax",
                                "--temperature", "1e-300"), "are not finite")
    assert not (tmp_path / "u").exists()


def test_personalize_on_an_unfinished_bank(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    shutil.copytree(root / "bank", tmp_path / "bank")
    (tmp_path / "bank" / "manifest.json").unlink()
    _fails(capsys, _personalize(tmp_path / "bank", movie_data, "1", tmp_path / "u"),
           "did not finish; rerun `mta bank build` with the same arguments to resume it")
    assert not (tmp_path / "u").exists()


def test_personalize_with_a_corrupt_anchor(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    shutil.copytree(root / "bank", tmp_path / "bank")
    for f in (tmp_path / "bank" / "anchors").glob("*/adapter_model.safetensors"):
        f.write_bytes(f.read_bytes()[:-10])
    _fails(capsys, _personalize(tmp_path / "bank", movie_data, "1", tmp_path / "u"), "does not match the bank manifest (changed or corrupt)")
    assert not (tmp_path / "u").exists()


def test_generate_needs_input_or_data(capsys, pipeline):
    root, _ = pipeline
    _fails(capsys, ["generate", "--bank", root / "bank", "--user", root / "users" / "0", "--device", "cpu"],
           "pass --input TEXT, or --data FILE and --out FILE for batch mode")


def test_generate_input_needs_one_user(capsys, pipeline):
    root, _ = pipeline
    _fails(capsys, ["generate", "--bank", root / "bank", "--user", root / "users", "--input", "x", "--device", "cpu"],
           "--input answers for one user: pass a single user folder")


def test_generate_not_a_user_folder(capsys, tmp_path):
    _fails(capsys, ["generate", "--user", tmp_path, "--input", "x"], "is neither a user folder (with user.json) nor a folder of them")


def test_generate_without_the_bank(capsys, pipeline):
    root, _ = pipeline
    _fails(capsys, ["generate", "--user", root / "users" / "0", "--input", "x", "--device", "cpu"], "was fused from a bank: pass --bank")


def test_generate_batch_user_not_in_data(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    data = [u for u in json.loads(movie_data.read_text()) if str(u["user_id"]) != "5"]
    (tmp_path / "d.json").write_text(json.dumps(data))
    _fails(capsys, ["generate", "--bank", root / "bank", "--user", root / "users", "--data", tmp_path / "d.json",
                    "--out", tmp_path / "preds.json", "--device", "cpu"], "user '5'")
    assert not (tmp_path / "preds.json").exists()


@pytest.mark.parametrize("preds, message", [
    ("[1, 2", "predictions file"),
    ({"golds": []}, "missing field(s) ['task']"),
    ({"task": "LaMP_4", "golds": []}, "holds predictions for 'LaMP_4', not LaMP-2"),
    ({"task": "LaMP_2", "golds": "x"}, "'golds' must be a list"),
    ({"task": "LaMP_2", "golds": [{"id": "1"}]}, "prediction #0: missing field(s) ['output']"),
    ({"task": "LaMP_2", "golds": [{"id": "1", "output": "a"}, {"id": "1", "output": "b"}]}, "id '1' appears twice"),
    ({"task": "LaMP-2", "golds": [{"id": "nope", "output": "comedy"}]}, "1 prediction id(s) have no gold in"),
    ({"task": "LaMP_2", "golds": []}, "holds no predictions"),
    ({"task": "LaMP_2", "golds": [{"id": "1", "output": None}]}, "prediction #0 (id '1'): 'output' must be a string, got None"),
    ({"task": "LaMP_2", "golds": [{"id": "1", "output": ["comedy"]}]}, "'output' must be a string, got ['comedy']"),
])
def test_eval_bad_predictions(capsys, tmp_path, movie_data, preds, message):
    (tmp_path / "p.json").write_text(preds if isinstance(preds, str) else json.dumps(preds))
    _fails(capsys, ["eval", "--task", "LaMP-2", "--predictions", tmp_path / "p.json", "--data", movie_data], message)


def test_argparse_errors_exit_2(capsys):
    _fails(capsys, ["personalize", "--merge", "ties"], "invalid choice: 'ties'")


def test_serve_store_errors_are_one_line(capsys, pipeline, tmp_path):
    pytest.importorskip("psycopg")
    pytest.importorskip("uvicorn")
    bank = pipeline[0] / "bank"
    err = _fails(capsys, ["serve", "--bank", bank, "--store", "postgresql://mta:secret@127.0.0.1:1/mta"],
                 "cannot connect to the user store at postgresql://mta:***@127.0.0.1:1/mta: ")
    assert "secret" not in err
    _fails(capsys, ["serve", "--bank", bank, "--store", tmp_path / "store", "--replicas", "2"], "--replicas needs a store they can share")
    _fails(capsys, ["serve", "--bank", bank, "--store", "postgresql://x@127.0.0.1:1/x", "--replicas", "2", "--max-replicas", "1"],
           "--max-replicas at least --replicas")


def test_help_exits_0(capsys):
    assert main(["bank", "build", "--help"]) == 0 and "--num-clusters" in capsys.readouterr().out


def _bad_arguments():
    """(argv with DATA and OUT placeholders, what the one-line error says): every number and path checked at parse time."""
    build = ["bank", "build", "--task", "LaMP-2", "--data", "DATA", "--out", "OUT"]
    personalize = ["personalize", "--bank", "OUT", "--user-data", "DATA", "--user-id", "1", "--out", "OUT"]
    generate = ["generate", "--bank", "OUT", "--user", "OUT"]
    serve = ["serve", "--bank", "OUT", "--store", "OUT"]
    bench = ["bench", "--task", "LaMP-2", "--data", "DATA", "--out", "OUT"]
    return [
        (build + ["--rank", "0"], "argument --rank: value must be an integer of at least 1, got 0"),
        (build + ["--num-clusters", "0"], "argument --num-clusters: value must be an integer of at least 1"),
        (build + ["--min-history", "-1"], "argument --min-history:"),
        (build + ["--lr", "-1"], "argument --lr: value must be a positive number, got -1.0"),
        (build + ["--lr", "nan"], "argument --lr: value must be a positive number, got nan"),
        (build + ["--lr", "inf"], "argument --lr: value must be a positive number, got inf"),
        (build + ["--batch-size", "0"], "argument --batch-size: value must be an integer of at least 1"),
        (build + ["--max-length", "0"], "argument --max-length: value must be an integer of at least 64, got 0"),
        (build + ["--max-length", "5"], "argument --max-length: value must be an integer of at least 64, got 5"),
        (build + ["--epochs", "0"], "argument --epochs: value must be a positive number, got 0.0"),
        (build + ["--epochs", "-1"], "argument --epochs: value must be a positive number, got -1.0"),
        (build + ["--epochs", "two"], "argument --epochs: expected a number, got 'two'"),
        (build + ["--retrieve", "-1"], "argument --retrieve: value must be an integer of at least 0, got -1"),
        (build + ["--seed", "-1"], "argument --seed:"),
        (build + ["--rank", "1.5"], "argument --rank: expected an integer, got '1.5'"),
        (["bank", "build", "--task", "LaMP-2", "--data", "nope.json", "--out", "OUT"], "argument --data: no such file: nope.json"),
        (personalize + ["--k", "0"], "argument --k: value must be an integer of at least 1"),
        (personalize + ["--temperature", "0"], "argument --temperature: value must be a positive number, got 0.0"),
        (personalize + ["--fusion-scale", "-0.5"], "argument --fusion-scale:"),
        (personalize + ["--stack-top-layers", "0"], "argument --stack-top-layers:"),
        (personalize + ["--svd-rank", "0"], "argument --svd-rank:"),
        (generate + ["--max-new-tokens", "0"], "argument --max-new-tokens: value must be an integer of at least 1, got 0"),
        (generate + ["--max-new-tokens", "-5"], "argument --max-new-tokens: value must be an integer of at least 1, got -5"),
        (generate + ["--input", ""], "argument --input: the text is empty"),
        (generate + ["--input", "  "], "argument --input: the text is empty"),
        (generate + ["--data", "DATA", "--out", "OUT"], "argument --out: OUT is a folder; name a file to write"),
        (generate + ["--input", "x", "--no-repeat-ngram", "-1"], "argument --no-repeat-ngram:"),
        (["eval", "--task", "2", "--predictions", "nope.json", "--data", "DATA"], "argument --predictions: no such file: nope.json"),
        (serve + ["--port", "99999"], "argument --port: a port must lie in 1-65535, got 99999"),
        (serve + ["--port", "0"], "argument --port: a port must lie in 1-65535, got 0"),
        (serve + ["--max-batch", "0"], "argument --max-batch: value must be an integer of at least 1, got 0"),
        (serve + ["--max-queue", "0"], "argument --max-queue:"),
        (serve + ["--max-wait-ms", "-1"], "argument --max-wait-ms: max wait must be 0 ms or more, got -1.0"),
        (serve + ["--threads", "0"], "argument --threads:"),
        (bench + ["--eval-fraction", "1.5"], "argument --eval-fraction: value must lie strictly between 0 and 1"),
        (bench + ["--limit-users", "0"], "argument --limit-users:"),
        (bench + ["--history-sizes", "2,0"], "argument --history-sizes: value must be an integer of at least 1, got 0"),
        (bench + ["--bank-fractions", "0.5,x"], "argument --bank-fractions: expected comma-separated numbers, e.g. 0.25,0.5,1, got '0.5,x'"),
        (personalize + ["--pick-scale", "0.5,-1"], "argument --pick-scale: value must be a positive number, got -1.0"),
        (personalize + ["--learn-lr", "0"], "argument --learn-lr:"),
        (bench + ["--bank-lr", "0"], "argument --bank-lr:"),
        (bench + ["--stack-only-epochs", "-1"], "argument --stack-only-epochs:"),
        (["export", "--bank", "OUT", "--user", "OUT", "--out", "OUT", "--pad-rank", "0"], "argument --pad-rank:"),
        (["demo", "--users", "0"], "argument --users:"),
    ]


@pytest.mark.parametrize("argv, message", _bad_arguments(), ids=lambda x: " ".join(x[-2:]) if isinstance(x, list) else None)
def test_bad_arguments_fail_at_parse_time(capsys, tmp_path, movie_data, argv, message):
    """One line, exit 2, before anything is loaded or written (OUT is an empty folder and stays one)."""
    (tmp_path / "OUT").mkdir()
    fill = {"DATA": str(movie_data), "OUT": str(tmp_path / "OUT")}
    _fails(capsys, [fill.get(a, a) for a in argv], message.replace("OUT", str(tmp_path / "OUT")))
    assert list((tmp_path / "OUT").iterdir()) == []


# -- --out never replaces what mta did not write ---------------------------------------------------------------------

def test_personalize_refuses_a_folder_it_did_not_write(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        _fails(capsys, _personalize(root / "bank", movie_data, "1", tmp_path / "mine", *extra),
               "is a folder that is not an mta user folder (no user.json): mta never replaces it")
    assert snapshot(tmp_path / "mine") == {"notes.txt": b"keep me"}


def test_personalize_never_replaces_the_folder_of_user_folders(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    shutil.copytree(root / "users", tmp_path / "users")
    before = snapshot(tmp_path / "users")
    _fails(capsys, _personalize(root / "bank", movie_data, "1", tmp_path / "users", "--overwrite"), "is a folder that is not an mta user folder")
    # without --user-id the users go below --out: a user folder given as --out is refused
    _fails(capsys, ["personalize", "--bank", root / "bank", "--user-data", movie_data, "--out", tmp_path / "users" / "0", *FAST],
           "is a user folder: without --user-id every user is written to --out/<user_id>/")
    (tmp_path / "users" / "7").mkdir()  # a folder of someone else's where user 7's would go
    (tmp_path / "users" / "7" / "data.bin").write_bytes(b"x")
    _fails(capsys, ["personalize", "--bank", root / "bank", "--user-data", movie_data, "--out", tmp_path / "users", "--overwrite",
                    *FAST], f"{tmp_path / 'users' / '7'} is a folder that is not an mta user folder")
    assert snapshot(tmp_path / "users") == {**before, "7/data.bin": b"x"}


def test_personalize_replaces_its_own_user_folder_only_with_overwrite(capsys, pipeline, tmp_path, movie_data):
    root, _ = pipeline
    shutil.copytree(root / "users" / "0", tmp_path / "0")
    before = snapshot(tmp_path / "0")
    _fails(capsys, _personalize(root / "bank", movie_data, "0", tmp_path / "0"), "is an mta user folder already; pass --overwrite")
    assert snapshot(tmp_path / "0") == before
    rc, _, err = _run(*_personalize(root / "bank", movie_data, "0", tmp_path / "0", "--overwrite", "--no-stack"))
    assert rc == 0, err
    assert not (tmp_path / "0" / "adapter").exists() and json.loads((tmp_path / "0" / "user.json").read_text())["stack"] is None


def test_a_hub_model_id_says_the_hub_is_off(tmp_path, movie_data):
    """The CLI runs offline (HF_HUB_OFFLINE=1 unless set): a hub id names that, and how to pass a local folder instead."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_HOME": str(tmp_path / "hf")}  # an empty cache
    r = subprocess.run([sys.executable, "-m", "mta.cli", "bank", "build", "--task", "2", "--data", str(movie_data), "--out",
                        str(tmp_path / "bank"), "--model", "HuggingFaceTB/SmolLM2-135M-Instruct"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert ("mta: error: cannot load model 'HuggingFaceTB/SmolLM2-135M-Instruct': the Hugging Face hub is off (HF_HUB_OFFLINE=1) "
            "and it is neither a local folder nor in the hub's cache") in r.stderr
    assert "pass a local folder" in r.stderr and "set HF_HUB_OFFLINE=0" in r.stderr
    assert not (tmp_path / "bank").exists()


def test_an_explicit_hf_hub_offline_0_is_kept(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    _quiet_hf()
    assert os.environ["HF_HUB_OFFLINE"] == "0"


# -- fuzzed: the parser takes exactly the values the settings take ---------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("MTA_FUZZ_EXAMPLES", "60"))
# flag → (subcommand argv, what the library does with the value: raises MTAError if it refuses it)
FLAG_RULES = {
    "--rank": (["bank", "build"], lambda v: LoraSpec(rank=v)),
    "--num-clusters": (["bank", "build"], lambda v: AnchorConfig(num_clusters=v)),
    "--retrieve": (["bank", "build"], lambda v: BankConfig("LaMP-2", num_retrieved=v)),
    "--lr": (["bank", "build"], lambda v: TrainConfig(learning_rate=v)),
    "--epochs": (["bank", "build"], lambda v: TrainConfig(epochs=v)),
    "--batch-size": (["bank", "build"], lambda v: TrainConfig(batch_size=v)),
    "--max-length": (["bank", "build"], lambda v: TrainConfig(max_length=v)),
    "--temperature": (["personalize"], lambda v: FusionConfig(temperature=v)),
    "--k": (["personalize"], lambda v: FusionConfig(k=v)),
    "--max-new-tokens": (["generate"], lambda v: ServeConfig(max_new_tokens=v)),
    "--max-batch": (["serve"], lambda v: ServeConfig(max_batch=v)),
    "--max-wait-ms": (["serve"], lambda v: ServeConfig(max_wait_ms=v)),
}
REQUIRED = {"bank": ["--task", "2", "--data", "DATA", "--out", "x"], "personalize": ["--bank", "b", "--user-data", "DATA", "--out", "x"],
            "generate": ["--user", "u"], "serve": ["--bank", "b", "--store", "s"]}
NUMBERS = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["", " ", "1e309", "-0", "0x10", "1_000", "٣"]), st.text(max_size=8))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(sorted(FLAG_RULES)), text=NUMBERS)
def test_the_parser_takes_what_the_settings_take(movie_data, flag, text):
    argv, rule = FLAG_RULES[flag]
    full = [*argv, *(a if a != "DATA" else str(movie_data) for a in REQUIRED[argv[0]]), f"{flag}={text}"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser().parse_args(full)
        except SystemExit as e:
            assert e.code == 2 and re.match(r"mta [a-z ]+: error: argument " + flag, err.getvalue()), err.getvalue()
            assert len(err.getvalue().strip().splitlines()) == 1
            with pytest.raises((MTAError, ValueError, OverflowError)):  # refused here: refused by the library too
                rule(_as_number(text))
            return
    rule(getattr(args, flag.lstrip("-").replace("-", "_")))  # accepted here: accepted by the library


def _as_number(text: str):
    """The value a refused text would have given the library, if it is a number at all."""
    try:
        return int(text)
    except ValueError:
        return float(text)
