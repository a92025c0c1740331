"""The Ray executor against the local one: same bank, same users, through the CLI, on a 2-CPU local Ray.

Adapters are compared with torch.equal, not allclose: both runs seed each anchor and each stacked LoRA
before creating it, and CPU float32 training of this model is bitwise reproducible across processes
(and across 1 or 2 torch threads, checked by hand), so any difference is a real divergence (a wrong
seed or anchor index, state leaking from an earlier anchor or user), never rounding.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from safetensors.torch import load_file

from mta.cli import main
from mta.io import MTAError

TRAIN = ["--epochs", "1", "--batch-size", "4", "--max-length", "96"]


def bank_cmd(data, model, out, *extra):
    return ["bank", "build", "--task", "LaMP-2", "--data", str(data), "--out", str(out), "--model", str(model),
            "--num-clusters", "3", "--min-history", "2", "--rank", "2", *TRAIN, *extra]


def personalize_cmd(bank, data, out, *extra):
    return ["personalize", "--bank", str(bank), "--user-data", str(data), "--out", str(out), "--k", "2", *TRAIN, *extra]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # "local": never join a cluster found on this host
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def banks(tmp_path_factory, ray_local, movie_data, tiny_model_dir):
    root = tmp_path_factory.mktemp("banks")
    assert main(bank_cmd(movie_data, tiny_model_dir, root / "local")) == 0
    assert main(bank_cmd(movie_data, tiny_model_dir, root / "ray", "--executor", "ray")) == 0
    return root / "local", root / "ray"


def assert_same_adapter(a, b):
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert ta[k].equal(tb[k]), k


def test_ray_bank_equals_local_bank(banks):
    local, ray = banks
    ml, mr = (json.loads((p / "manifest.json").read_text()) for p in banks)
    assert len(ml["anchors"]) == 3
    assert ml["base_signature"] == mr["base_signature"]
    for r in ml["anchors"] + mr["anchors"]:
        r.pop("train_seconds")
    assert ml["anchors"] == mr["anchors"]  # ids, users, steps, final loss and the adapter files' sha256
    assert load_file(local / "anchors.safetensors")["embeddings"].equal(load_file(ray / "anchors.safetensors")["embeddings"])
    for r in ml["anchors"]:
        assert_same_adapter(local / "anchors" / r["id"], ray / "anchors" / r["id"])


def test_ray_bank_rerun_trains_only_missing_anchors(banks, movie_data, tiny_model_dir, tmp_path):
    local, ray = banks
    bank = tmp_path / "bank"
    shutil.copytree(ray, bank)
    (bank / "manifest.json").unlink()  # as if the build had been interrupted after two anchors
    shutil.rmtree(bank / "anchors" / "anchor_001")
    kept = {a: (bank / "anchors" / a / "adapter_model.safetensors").stat().st_mtime_ns for a in ("anchor_000", "anchor_002")}
    assert main(bank_cmd(movie_data, tiny_model_dir, bank, "--executor", "ray")) == 0
    assert kept == {a: (bank / "anchors" / a / "adapter_model.safetensors").stat().st_mtime_ns for a in kept}
    assert_same_adapter(local / "anchors" / "anchor_001", bank / "anchors" / "anchor_001")


def test_ray_personalizes_every_user_like_local(banks, movie_data, tmp_path):
    local, _ = banks
    stores = {ex: tmp_path / ex for ex in ("local", "ray")}
    for ex, store in stores.items():
        assert main(personalize_cmd(local, movie_data, store, "--executor", ex)) == 0
    users = [str(u["user_id"]) for u in json.loads(movie_data.read_text())]
    for uid in users:
        rl, rr = (json.loads((s / uid / "user.json").read_text()) for s in stores.values())
        rl["stack"].pop("train_seconds"), rr["stack"].pop("train_seconds")
        assert rl == rr and rl["user_id"] == uid
        assert_same_adapter(stores["local"] / uid / "adapter", stores["ray"] / uid / "adapter")
    assert sorted(p.name for p in stores["ray"].iterdir()) == sorted(users)


def test_ray_single_user_writes_out_itself(banks, movie_data, tmp_path):
    local, _ = banks
    uid = str(json.loads(movie_data.read_text())[0]["user_id"])
    assert main(personalize_cmd(local, movie_data, tmp_path / "u", "--user-id", uid, "--executor", "ray")) == 0
    assert json.loads((tmp_path / "u" / "user.json").read_text())["user_id"] == uid


def test_missing_ray_says_how_to_install(monkeypatch, tiny_model_dir, tmp_path):
    from mta.config import BankConfig
    from mta.executors import run_bank

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(MTAError, match=r"pip install -e '\.\[ray\]'"):
        run_bank([], tmp_path, BankConfig(task="LaMP-2", base_model=str(tiny_model_dir)), executor="ray")


@pytest.mark.parametrize("bad", ["..", "a/b", "a b", ".hidden", "é"])
def test_personalize_many_refuses_ids_that_cannot_name_a_folder(tmp_path, bad):
    """The same rule as the serving store's: a user personalized here can be served under the same id."""
    from mta.data.lamp import User
    from mta.executors import store_folders

    assert store_folders([User("8000002", [{}])], tmp_path) == [(User("8000002", [{}]), tmp_path / "8000002")]
    with pytest.raises(MTAError, match=r"invalid user id .*--user-id"):
        store_folders([User("8000002", []), User(bad, [])], tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything was written
