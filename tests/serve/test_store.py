"""The user store, on SQLite and on a real PostgreSQL alike: round trips, versions guarding adapt jobs, safe ids,
jobs that outlive their server, bf16 adapters, and consistency after a kill -9."""

import multiprocessing
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mta.adapters import LoraWeights
from mta.data.lamp import check_user_id
from mta.fusion import FusionRecord
from mta.io import MTAError
from mta.serve.store import INTERRUPTED, SQLiteStore, StaleUserError, open_store
from mta.stacking import UserRecord


def _record(user_id: str, stack: dict | None = None) -> UserRecord:
    return UserRecord(user_id, "LaMP-2", "tiny", "fp0", FusionRecord(["anchor_000", "anchor_001"], [0.9, 0.5], [0.7, 0.3], "exact"), stack)


MODULE = "model.layers.0.mlp.up_proj"


def _lora(seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights({MODULE: (torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g))})


def _adapter_files(where: str) -> set[str]:
    """SQLite's adapter files (PostgreSQL keeps the bytes in the user's row: nothing can be left over)."""
    folder = Path(where) / "adapters"
    return {f.name for f in folder.iterdir()} if folder.is_dir() else set()


def test_round_trip_and_versions(store_at):
    profile = [{"description": "a film", "tag": "comedy"}]
    with open_store(store_at) as store:
        assert store.get("alice") is None
        u = store.put(_record("alice"), profile)
        assert (u.version, u.adapter) == (1, None) and store.stacked(u) is None
        stacked = store.set_stacked(_record("alice", {"rank": 2}), _lora(0), expected_version=1)
        assert stacked.version == 2 and stacked.record.stack == {"rank": 2} and stacked.profile == profile
        assert store.get("alice") == stacked
        for (a, b), (a0, b0) in zip(store.stacked(store.get("alice")).modules.values(), _lora(0).modules.values()):
            assert torch.equal(a, a0) and torch.equal(b, b0)
        with pytest.raises(StaleUserError, match="changed while"):  # an adapt job that trained on version 1
            store.set_stacked(_record("alice", {"rank": 2}), _lora(1), expected_version=1)
        with pytest.raises(StaleUserError, match="removed"):
            store.set_stacked(_record("bob", {"rank": 2}), _lora(1), expected_version=1)
        assert _adapter_files(store_at) <= {stacked.adapter}  # the stale job's file is gone
        store.put(_record("alice"), profile + profile)  # a new profile drops the stacked LoRA (and its file)
        assert store.get("alice").adapter is None and not _adapter_files(store_at)
        with pytest.raises(StaleUserError, match="changed while their adapter was read"):
            store.stacked(stacked)  # a reader that held the old copy
    with open_store(store_at) as store:
        assert store.user_ids() == ["alice"] and len(store) == 1
        assert store.get("alice").profile == profile + profile and store.get("alice").version == 3


def test_import_users_writes_many_in_one_transaction(store_at):
    with open_store(store_at) as store:
        store.put(_record("u0"), [{"i": -1}])
        old = store.set_stacked(_record("u0", {"rank": 2}), _lora(99), expected_version=1)
        rows = [(_record(f"u{i}", {"rank": 2} if i % 2 == 0 else None), [{"i": i}], _lora(i) if i % 2 == 0 else None) for i in range(5)]
        assert store.import_users(iter(rows), batch_size=2) == 5
        users = {uid: store.get(uid) for uid in store.user_ids()}
        assert [u.profile[0]["i"] for u in users.values()] == list(range(5)) and users["u0"].version == old.version + 1
        for i, u in enumerate(users.values()):
            assert (u.adapter is not None) == (i % 2 == 0)
            if u.adapter:
                torch.testing.assert_close(store.stacked(u).delta(MODULE), _lora(i).delta(MODULE), rtol=0, atol=0)
        assert _adapter_files(store_at) == ({u.adapter for u in users.values() if u.adapter} if "://" not in store_at else set())
        with pytest.raises(MTAError, match="comes with its stacked LoRA"):
            store.import_users([(_record("u9", {"rank": 2}), [], None)])


def test_one_process_owns_a_sqlite_store(tmp_path):
    with open_store(tmp_path / "s") as store:
        assert isinstance(store, SQLiteStore)
        with pytest.raises(MTAError, match="in use"):
            open_store(tmp_path / "s")


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", ".hidden", "-x", "a b", "x" * 129, "a\x00b", "é"])
def test_unsafe_user_ids_are_refused(tmp_path, bad):
    with pytest.raises(MTAError, match="invalid user id"):
        check_user_id(bad)
    with open_store(tmp_path / "s") as store, pytest.raises(MTAError, match="invalid user id"):
        store.put(_record(bad), [])


def test_jobs_outlive_their_server(store_at):
    """A job's status is in the store; one whose server died (its lease ran out) reports failed, never 'running' forever."""
    with open_store(store_at) as store:
        store.put(_record("alice"), [{"i": 0}])
        store.put(_record("bob"), [{"i": 0}])
        job, new = store.add_job("alice", "server-1", lease_s=60, keep_finished=2)
        assert new and job.status == "queued"
        assert store.add_job("alice", "server-2", lease_s=60, keep_finished=2) == (job, False)  # one at a time per user
        job.status, job.finished, job.stack = "done", time.time(), {"rank": 2}
        store.update_job(job)
        assert store.job(job.id) == job
        finished = [job.id]
        for _ in range(2):  # only the newest `keep_finished` finished jobs stay (a new job prunes the rest)
            j, _ = store.add_job("alice", "server-1", lease_s=60, keep_finished=2)
            j.status, j.finished = "failed", time.time()
            store.update_job(j)
            finished.append(j.id)
        running, _ = store.add_job("bob", "server-1", lease_s=0.5, keep_finished=2)
        assert store.job(finished[0]) is None and store.job(finished[2]).status == "failed"
        running.status = "running"
        store.update_job(running)
        store.renew_jobs("server-1", lease_s=0.5)
        assert store.job(running.id).status == "running"
    time.sleep(0.6)  # server-1 died: nobody renews its lease
    with open_store(store_at) as store:
        after = store.job(running.id)
        assert (after.status, after.error) == ("failed", INTERRUPTED) and after.finished is not None
        assert store.job(finished[2]).status == "failed" and store.job("nope") is None
        assert store.add_job("bob", "server-2", lease_s=60, keep_finished=2)[1]  # the user can adapt again


def test_bf16_adapters_take_half_the_bytes_and_load_as_float32(tmp_path, postgres_url):
    big = LoraWeights({MODULE: (torch.randn(2, 576), torch.randn(576, 2))})
    sizes = {}
    for dtype in ("fp32", "bf16"):
        for where in (tmp_path / dtype, postgres_url):
            with open_store(where, adapter_dtype=dtype) as store:
                store.put(_record(f"u-{dtype}"), [])
                user = store.set_stacked(_record(f"u-{dtype}", {"rank": 2}), big, expected_version=1)
                loaded = store.stacked(user)
                sizes[dtype] = len(store._adapter_bytes(user))
            a, b = loaded.modules[MODULE]
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, big.modules[MODULE][0], rtol=1e-2 if dtype == "bf16" else 0, atol=0)
    assert sizes["bf16"] < 0.52 * sizes["fp32"]
    with pytest.raises(MTAError, match="unknown adapter dtype"):
        open_store(tmp_path / "x", adapter_dtype="fp8")


def test_an_unreachable_postgres_is_one_clear_line(tmp_path):
    pytest.importorskip("psycopg")
    with pytest.raises(MTAError, match=r"^cannot connect to the user store at postgresql://mta:\*\*\*@127.0.0.1:1/mta: ") as e:
        open_store("postgresql://mta:secret@127.0.0.1:1/mta")
    assert "secret" not in str(e.value)


def _writer(where, start: int, conn) -> None:
    """Rewrite 7 users over and over (profile, then stacked LoRA); report each write once both commits are done."""
    store, i = open_store(where), start
    while True:
        uid = f"u{i % 7}"
        user = store.put(_record(uid), [{"i": i}])
        store.set_stacked(_record(uid, {"rank": 2, "i": i}), _lora(i), expected_version=user.version)
        conn.send((uid, i))
        i += 1


def test_a_killed_writer_leaves_a_consistent_store(store_at):
    """kill -9 at arbitrary moments: every committed write survives whole, nothing half-written is visible."""
    start, last = 0, {}
    ctx = multiprocessing.get_context("fork")  # the child needs no fresh interpreter: it only writes
    for round_ in range(3):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_writer, args=(store_at, start, send), daemon=True)
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
        with open_store(store_at) as store:  # opening a SQLite store removes the files of an interrupted write
            users = [store.get(uid) for uid in store.user_ids()]
            assert _adapter_files(store_at) == ({u.adapter for u in users if u.adapter} if "://" not in store_at else set())
            for u in users:
                i = u.profile[0]["i"]
                assert i >= last.get(u.record.user_id, -1)  # nothing reported as written was lost
                if u.adapter:  # and an adapter always belongs to the profile write it was trained for
                    assert u.record.stack["i"] == i
                    torch.testing.assert_close(store.stacked(u).delta(MODULE), _lora(i).delta(MODULE), rtol=0, atol=0)
            start = 1 + max(u.profile[0]["i"] for u in users)


def _die_before_commit(where) -> None:
    """Attach a new adapter, and die once its write has run inside the transaction, before the commit."""
    store = open_store(where)
    transaction = store._transaction

    @contextmanager
    def dying():
        with transaction() as db:
            yield _DieAfter(db, "UPDATE users")

    store._transaction = dying
    store.set_stacked(_record("alice", {"rank": 2}), _lora(1), expected_version=2)


class _DieAfter:
    def __init__(self, db, prefix: str):
        self._db, self._prefix = db, prefix

    def execute(self, sql: str, params=()):
        out = self._db.execute(sql, params)
        if sql.startswith(self._prefix):
            os.kill(os.getpid(), signal.SIGKILL)
        return out


def test_a_kill_before_the_commit_leaves_the_old_state(store_at):
    with open_store(store_at) as store:
        store.put(_record("alice"), [{"i": 0}])
        old = store.set_stacked(_record("alice", {"rank": 2}), _lora(0), expected_version=1)
    proc = multiprocessing.get_context("fork").Process(target=_die_before_commit, args=(store_at,))
    proc.start()
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    if "://" not in store_at:
        assert len(_adapter_files(store_at)) == 2  # the new adapter's file is on disk, the row does not point at it
    with open_store(store_at) as store:
        assert store.get("alice") == old and _adapter_files(store_at) <= {old.adapter}
        torch.testing.assert_close(store.stacked(old).delta(MODULE), _lora(0).delta(MODULE), rtol=0, atol=0)
