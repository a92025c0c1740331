"""The user store: round trips, versions guarding adapt jobs, safe ids, and consistency after a kill -9."""

import multiprocessing
import os
import signal
import time

import pytest
import torch

from mta.adapters import LoraWeights
from mta.data.lamp import check_user_id
from mta.fusion import FusionRecord
from mta.io import MTAError
from mta.serve.store import StaleUserError, UserStore
from mta.stacking import UserRecord


def _record(user_id: str, stack: dict | None = None) -> UserRecord:
    return UserRecord(user_id, "LaMP-2", "tiny", "fp0", FusionRecord(["anchor_000", "anchor_001"], [0.9, 0.5], [0.7, 0.3], "exact"), stack)


MODULE = "model.layers.0.mlp.up_proj"


def _lora(seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights({MODULE: (torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g))})


def test_round_trip_and_versions(tmp_path):
    profile = [{"description": "a film", "tag": "comedy"}]
    with UserStore(tmp_path / "s") as store:
        assert store.get("alice") is None
        u = store.put(_record("alice"), profile)
        assert (u.version, u.adapter) == (1, None) and store.stacked(u) is None
        stacked = store.set_stacked(_record("alice", {"rank": 2}), _lora(0), expected_version=1)
        assert stacked.version == 2 and stacked.record.stack == {"rank": 2}
        for (a, b), (a0, b0) in zip(store.stacked(store.get("alice")).modules.values(), _lora(0).modules.values()):
            assert torch.equal(a, a0) and torch.equal(b, b0)
        with pytest.raises(StaleUserError, match="changed while"):  # an adapt job that trained on version 1
            store.set_stacked(_record("alice", {"rank": 2}), _lora(1), expected_version=1)
        assert len(list((tmp_path / "s" / "adapters").iterdir())) == 1  # the stale job's file is gone
        store.put(_record("alice"), profile + profile)  # a new profile drops the stacked LoRA and its file
        assert store.get("alice").adapter is None and not list((tmp_path / "s" / "adapters").iterdir())
        with pytest.raises(MTAError, match="in use"):
            UserStore(tmp_path / "s")
    with UserStore(tmp_path / "s") as store:
        assert store.user_ids() == ["alice"] and store.get("alice").profile == profile + profile and store.get("alice").version == 3


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", ".hidden", "-x", "a b", "x" * 129, "a\x00b", "é"])
def test_unsafe_user_ids_are_refused(tmp_path, bad):
    with pytest.raises(MTAError, match="invalid user id"):
        check_user_id(bad)
    with UserStore(tmp_path / "s") as store, pytest.raises(MTAError, match="invalid user id"):
        store.put(_record(bad), [])


def _writer(path, start: int, conn) -> None:
    """Rewrite 7 users over and over (profile, then stacked LoRA); report each write once both commits are done."""
    store, i = UserStore(path), start
    while True:
        uid = f"u{i % 7}"
        user = store.put(_record(uid), [{"i": i}])
        store.set_stacked(_record(uid, {"rank": 2, "i": i}), _lora(i), expected_version=user.version)
        conn.send((uid, i))
        i += 1


def test_a_killed_writer_leaves_a_consistent_store(tmp_path):
    """kill -9 at arbitrary moments: every committed write survives whole, nothing half-written is visible."""
    path, start, last = tmp_path / "s", 0, {}
    ctx = multiprocessing.get_context("fork")  # the child needs no fresh interpreter: it only writes
    for round_ in range(3):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_writer, args=(path, start, send), daemon=True)
        proc.start()
        for _ in range(5 + 7 * round_):
            assert receive.poll(30), "the writer stalled"
            uid, i = receive.recv()
            last[uid] = i
        time.sleep(0.01 * round_)
        proc.kill()
        proc.join()
        while receive.poll():
            uid, i = receive.recv()
            last[uid] = i
        with UserStore(path) as store:  # opening removes the files of an interrupted write
            files = {f.name for f in (path / "adapters").iterdir()}
            users = [store.get(uid) for uid in store.user_ids()]
            assert files == {u.adapter for u in users if u.adapter}
            for u in users:
                i = u.profile[0]["i"]
                assert i >= last.get(u.record.user_id, -1)  # nothing reported as written was lost
                if u.adapter:  # and an adapter always belongs to the profile write it was trained for
                    assert u.record.stack["i"] == i
                    torch.testing.assert_close(store.stacked(u).delta(MODULE), _lora(i).delta(MODULE), rtol=0, atol=0)
            start = 1 + max(u.profile[0]["i"] for u in users)


def _die_before_commit(path) -> None:
    store = UserStore(path)
    store._write = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # the adapter file is on disk, the row is not
    store.set_stacked(_record("alice", {"rank": 2}), _lora(1), expected_version=2)


def test_a_kill_between_file_and_commit_leaves_the_old_state(tmp_path):
    with UserStore(tmp_path / "s") as store:
        store.put(_record("alice"), [{"i": 0}])
        old = store.set_stacked(_record("alice", {"rank": 2}), _lora(0), expected_version=1)
    proc = multiprocessing.get_context("fork").Process(target=_die_before_commit, args=(tmp_path / "s",))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL and len(list((tmp_path / "s" / "adapters").iterdir())) == 2
    with UserStore(tmp_path / "s") as store:
        assert store.get("alice") == old and [f.name for f in (tmp_path / "s" / "adapters").iterdir()] == [old.adapter]
