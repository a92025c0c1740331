"""The server's user store: users, profiles, fusion records, adapt jobs and stacked LoRAs, in SQLite or PostgreSQL.

`open_store(where)` picks the backend by name: a ``postgresql://`` URL is a PostgreSQL database that many
server replicas share; anything else is a folder that one server owns (SQLite, the embedded default)::

    <folder>/users.db                        SQLite: the tables below
    <folder>/adapters/<random>.safetensors   one stacked LoRA per file, written once and never changed

Both backends hold the same tables and keep the same promises, which `UserStore` implements once:

- ``users``: one row per user (UserRecord JSON, profile JSON, the id of their stacked LoRA, a version bumped
  by every write). PostgreSQL keeps the LoRA's safetensors bytes in the row (``stacked``, bytea), so replicas
  on other machines need no shared file system; SQLite keeps them in ``adapters/``.
- ``jobs``: adapt jobs (status, error, stack figures), so a job's status outlives the server that ran it.
- Every write is one transaction that first locks the user's row and checks its version: an adapt job
  commits only onto the version it trained from (else StaleUserError).
- Nothing is lost on ``kill -9``: a transaction commits durably or not at all. SQLite's adapter file is
  complete on disk (temp file, fsync, rename) *before* the transaction that points at it, and a replaced
  file is deleted only *after* that commit; the worst leftover, an unreferenced file, is deleted when the
  store is next opened.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

from mta.adapters import LoraWeights
from mta.config import ADAPTER_DTYPES, check_adapter_dtype
from mta.data.lamp import check_user_id
from mta.io import MTAError, atomic_write_bytes
from mta.stacking import UserRecord

_SCHEMA_VERSION = 1  # the jobs table (added later) is new, not changed: older readers still work
_FORMAT = {"format": "mta-stacked-lora", "scaling": "folded"}
_ACTIVE = "('queued', 'running')"
INTERRUPTED = "interrupted by a restart: adapt again"


class StaleUserError(MTAError):
    """The user changed while a job worked from an older copy: its result no longer applies."""


@dataclass(frozen=True)
class StoredUser:
    record: UserRecord
    profile: list[dict]
    adapter: str | None  # id of the stacked LoRA (SQLite: its file's name), None before adaptation
    version: int  # bumped by every write; an adapt job commits only onto the version it trained from


@dataclass
class Job:
    id: str
    user_id: str
    status: str = "queued"  # queued | running | done | failed
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    stack: dict | None = None


def open_store(where: str | Path, readonly: bool = False, adapter_dtype: str = "fp32") -> "UserStore":
    """A PostgreSQL store for a ``postgresql://`` (or ``postgres://``) URL, else a SQLite store folder.

    `readonly` reads a store that a live server may be writing. `adapter_dtype` is how new stacked LoRAs are
    stored ("bf16" halves their bytes); whatever they were stored in, they load as float32.
    """
    check_adapter_dtype(adapter_dtype)
    if str(where).startswith(("postgresql://", "postgres://")):
        return PostgresStore(str(where), readonly, adapter_dtype)
    return SQLiteStore(Path(where), readonly, adapter_dtype)


def encode_adapter(weights: LoraWeights, dtype: str = "fp32") -> bytes:
    """The stacked LoRA as safetensors bytes, in `dtype` (a key of ADAPTER_DTYPES)."""
    import torch
    from safetensors.torch import save

    w = weights.to(getattr(torch, ADAPTER_DTYPES[dtype]), "cpu")
    # module paths without PEFT's "base_model.model." prefix: the header is repeated for every user (~0.5 KB less each)
    tensors = {f"{n}.lora_{x}.weight": t.contiguous() for n, (a, b) in w.modules.items() for x, t in (("A", a), ("B", b))}
    return save(tensors, metadata=_FORMAT)


def decode_adapter(data: bytes, where: str) -> LoraWeights:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise MTAError(f"{where} is not a readable stacked LoRA (truncated or corrupt?): {e}") from None
    return LoraWeights.from_peft_state_dict(tensors, {"r": 1, "lora_alpha": 1}, where).to(torch.float32)


class UserStore:
    """What both backends share: the tables, the version check, the adapter format and the jobs' life cycle.

    A backend supplies a transaction (`_transaction`, whose `execute` takes '?' placeholders), and where the
    adapter bytes live (`_stage`, `_unstage`, `_adapter_bytes`, `_BYTES`).
    """

    _BYTES = ""  # extra column of `users` that holds the adapter bytes, if the backend keeps them in the row
    _DDL = (
        "CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, record TEXT NOT NULL, profile TEXT NOT NULL, "
        "adapter TEXT, version INTEGER NOT NULL, updated DOUBLE PRECISION NOT NULL{bytes})",
        # owner: the server instance that runs the job; lease: until when it promises to renew it
        "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, status TEXT NOT NULL, error TEXT, "
        "created DOUBLE PRECISION NOT NULL, finished DOUBLE PRECISION, stack TEXT, owner TEXT NOT NULL, "
        "lease DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user_id, status)",
        "CREATE INDEX IF NOT EXISTS jobs_by_finished ON jobs (finished)",
    )
    _FOR_UPDATE = ""  # how a SELECT locks the rows it reads, where the transaction does not lock already

    def __init__(self, location: str, adapter_dtype: str):
        self.location, self.adapter_dtype = location, adapter_dtype

    # -- backend hooks --------------------------------------------------------------------------------
    def _transaction(self):
        raise NotImplementedError

    def _stage(self, staged: dict[str, bytes]) -> None:
        """Make adapters' bytes durable before rows point at them (SQLite's files); nothing where the row holds them."""

    def _unstage(self, adapters: list[str]) -> None:
        """Undo `_stage` after a failed commit; also frees replaced adapters' bytes after the commit that replaced them."""

    def _adapter_bytes(self, user: StoredUser) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # -- users ------------------------------------------------------------------------------------------
    def __enter__(self) -> "UserStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        with self._transaction() as db:
            return db.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def user_ids(self) -> list[str]:
        with self._transaction() as db:
            return [r[0] for r in db.execute("SELECT user_id FROM users ORDER BY user_id").fetchall()]

    def get(self, user_id: str) -> StoredUser | None:
        with self._transaction() as db:
            row = db.execute("SELECT record, profile, adapter, version FROM users WHERE user_id = ?",
                             (check_user_id(user_id),)).fetchone()
        if row is None:
            return None
        record = UserRecord.from_dict(json.loads(row[0]), f"user {user_id!r} in {self.location}")
        return StoredUser(record, json.loads(row[1]), row[2], row[3])

    def put(self, record: UserRecord, profile: list[dict]) -> StoredUser:
        """Create or replace a user. A new profile drops the stacked LoRA: it was trained on the old one."""
        if record.stack is not None:
            raise MTAError("put() stores a profile and its fusion; a stacked LoRA comes with set_stacked()")
        [(version,)] = self._write({}, [self._upsert(record, profile, None, None)])
        return StoredUser(record, profile, None, version)

    def import_users(self, users: Iterable[tuple[UserRecord, list[dict], LoraWeights | None]], batch_size: int = 256) -> int:
        """Create or replace many users with their stacked LoRAs (a migration, a benchmark's fill); returns how many.

        One transaction per batch instead of two per user; each batch is durable once written.
        """
        count, rest = 0, iter(users)
        while batch := list(itertools.islice(rest, batch_size)):
            staged, writes = {}, []
            for record, profile, stacked in batch:
                if (record.stack is None) != (stacked is None):
                    raise MTAError(f"user {record.user_id!r}: a record with stack figures comes with its stacked LoRA, and only then")
                adapter = f"{uuid.uuid4().hex}.safetensors" if stacked is not None else None
                if adapter:
                    staged[adapter] = encode_adapter(stacked, self.adapter_dtype)
                writes.append(self._upsert(record, profile, adapter, staged.get(adapter)))
            self._write(staged, writes)
            count += len(batch)
        return count

    def set_stacked(self, record: UserRecord, stacked: LoraWeights, expected_version: int) -> StoredUser:
        """Attach a trained stacked LoRA, unless the user changed since `expected_version` (StaleUserError)."""
        adapter, data = f"{uuid.uuid4().hex}.safetensors", encode_adapter(stacked, self.adapter_dtype)
        [(version, profile)] = self._write({adapter: data}, [(
            record.user_id, adapter, expected_version,
            f"UPDATE users SET record = ?, adapter = ?, version = version + 1, updated = ?{', stacked = ?' * bool(self._BYTES)} "
            "WHERE user_id = ? RETURNING version, profile",
            (_json(record), adapter, time.time()) + (data,) * bool(self._BYTES) + (record.user_id,))])
        return StoredUser(record, json.loads(profile), adapter, version)

    def _upsert(self, record: UserRecord, profile: list[dict], adapter: str | None, data: bytes | None) -> tuple:
        """The write that creates or replaces a user (a new version, whatever was there)."""
        check_user_id(record.user_id)
        cols = "user_id, record, profile, adapter, version, updated" + ", stacked" * bool(self._BYTES)
        return (record.user_id, adapter, None,
                f"INSERT INTO users ({cols}) VALUES ({', '.join('?' * len(cols.split(',')))}) ON CONFLICT (user_id) DO UPDATE SET "
                "record = excluded.record, profile = excluded.profile, adapter = excluded.adapter, version = users.version + 1, "
                f"updated = excluded.updated{', stacked = excluded.stacked' * bool(self._BYTES)} RETURNING version",
                (record.user_id, _json(record), json.dumps(profile), adapter, 1, time.time()) + (data,) * bool(self._BYTES))

    def _write(self, staged: dict[str, bytes], writes: list[tuple]) -> list[tuple]:
        """Stage adapter bytes, then run the writes in one transaction, each on its user's locked row after checking
        the version it expects (None: any); returns what each write RETURNs. Replaced adapters are freed after the commit.

        A write is (user_id, the adapter it points the user at, expected version, sql, params).
        """
        self._stage(staged)
        out, replaced = [], []
        try:
            with self._transaction() as db:
                for user_id, adapter, expected_version, sql, params in writes:
                    row = db.execute(f"SELECT adapter, version FROM users WHERE user_id = ?{self._FOR_UPDATE}", (user_id,)).fetchone()
                    if expected_version is not None and row is None:
                        raise StaleUserError(f"user {user_id!r} was removed while their adapter trained")
                    if expected_version is not None and row[1] != expected_version:
                        raise StaleUserError(f"user {user_id!r} changed while their adapter trained (version "
                                             f"{expected_version} → {row[1]}); adapt again")
                    out.append(db.execute(sql, params).fetchone())
                    if row and row[0] and row[0] != adapter:
                        replaced.append(row[0])
        except BaseException:
            self._unstage(list(staged))
            raise
        self._unstage(replaced)
        return out

    def stacked(self, user: StoredUser) -> LoraWeights | None:
        """The user's stacked LoRA factors (scaling folded in, float32), or None before adaptation."""
        if user.adapter is None:
            return None
        return decode_adapter(self._adapter_bytes(user), f"the stacked LoRA of user {user.record.user_id!r} in {self.location}")

    # -- adapt jobs -------------------------------------------------------------------------------------
    def add_job(self, user_id: str, owner: str, lease_s: float, keep_finished: int) -> tuple[Job, bool]:
        """A new queued job for the user, or the one already queued or running (then False: nothing to start).

        `owner` (a server instance) promises to renew the job's lease (`renew_jobs`) until it finishes; a job
        whose lease ran out reports failed. Only the newest `keep_finished` finished jobs are kept.
        """
        now = time.time()
        self.expire_jobs(now)
        with self._transaction() as db:
            db.execute(f"SELECT version FROM users WHERE user_id = ?{self._FOR_UPDATE}", (user_id,))  # one adder per user
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE user_id = ? AND status IN {_ACTIVE}", (user_id,)).fetchone()
            if row is not None:
                return _job(row), False
            job = Job(uuid.uuid4().hex, user_id, created=now)
            db.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}, owner, lease) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job.id, user_id, job.status, None, job.created, None, None, owner, now + lease_s))
            db.execute("DELETE FROM jobs WHERE finished IS NOT NULL AND id NOT IN "
                       "(SELECT id FROM jobs WHERE finished IS NOT NULL ORDER BY finished DESC LIMIT ?)", (keep_finished,))
        return job, True

    def update_job(self, job: Job) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = ?, error = ?, finished = ?, stack = ? WHERE id = ?",
                       (job.status, job.error, job.finished, json.dumps(job.stack) if job.stack else None, job.id))

    def job(self, job_id: str) -> Job | None:
        self.expire_jobs(time.time())
        with self._transaction() as db:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def renew_jobs(self, owner: str, lease_s: float) -> None:
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET lease = ? WHERE owner = ? AND status IN {_ACTIVE}", (time.time() + lease_s, owner))

    def expire_jobs(self, before: float, error: str = INTERRUPTED, owner: str | None = None) -> None:
        """Fail the queued and running jobs whose lease ended before `before` (and, given, of `owner`)."""
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET status = 'failed', error = ?, finished = ? WHERE status IN {_ACTIVE} AND lease < ?"
                       + " AND owner = ?" * (owner is not None), (error, time.time(), before) + (owner,) * (owner is not None))


_JOB_COLUMNS = "id, user_id, status, error, created, finished, stack"


def _job(row) -> Job:
    return Job(*row[:6], json.loads(row[6]) if row[6] else None)


def _json(record: UserRecord) -> str:
    return json.dumps(record.to_dict(), sort_keys=True)


class SQLiteStore(UserStore):
    """The embedded store: a folder that one server process owns (a lock file); rows in SQLite, adapters as files."""

    def __init__(self, path: Path, readonly: bool = False, adapter_dtype: str = "fp32"):
        super().__init__(str(path), adapter_dtype)
        self.path, self.adapters_dir = path, path / "adapters"
        self._lock, self._lock_file = threading.Lock(), None
        if readonly:  # WAL readers never block the writer
            if not (path / "users.db").is_file():
                raise MTAError(f"{path} is not a user store (no users.db)")
            self._db = sqlite3.connect(f"file:{path / 'users.db'}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
            self._check_schema()
            return
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(path / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise MTAError(f"user store {path} is in use by another process") from None
        self._db = sqlite3.connect(path / "users.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._check_schema()
        for ddl in self._DDL:
            self._db.execute(ddl.format(bytes=""))
        self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        self._remove_orphans()
        self.expire_jobs(math.inf)  # this process owns the store: no job that was queued or running still runs

    def _check_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > _SCHEMA_VERSION:
            raise MTAError(f"user store {self.path} has schema {version}; this mta reads up to {_SCHEMA_VERSION}: upgrade mta")

    def _remove_orphans(self) -> None:
        """Adapter files no row points at (and temp files) are what a kill between two steps leaves."""
        used = {r[0] for r in self._db.execute("SELECT adapter FROM users WHERE adapter IS NOT NULL")}
        for f in self.adapters_dir.iterdir():
            if f.name not in used:
                f.unlink(missing_ok=True)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One writer at a time (BEGIN IMMEDIATE); in a read-only store a plain read transaction."""
        with self._lock:
            self._db.execute("BEGIN" if self._lock_file is None else "BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _stage(self, staged: dict[str, bytes]) -> None:
        """Durable before any row may point at them: one fsync per file, or for many files one sync of the file system."""
        for adapter, data in staged.items():
            atomic_write_bytes(self.adapters_dir / adapter, data, fsync=len(staged) == 1)
        if len(staged) > 1:
            os.sync()

    def _unstage(self, adapters: list[str]) -> None:
        for adapter in adapters:
            (self.adapters_dir / adapter).unlink(missing_ok=True)

    def _adapter_bytes(self, user: StoredUser) -> bytes:
        try:
            return (self.adapters_dir / user.adapter).read_bytes()
        except FileNotFoundError:
            raise StaleUserError(f"user {user.record.user_id!r} changed while their adapter was read; retry") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()


class PostgresStore(UserStore):
    """A store that many server processes share: one PostgreSQL database, adapter bytes in the user's row.

    One connection, used by one thread at a time; it is opened again if the server dropped it.
    """

    _BYTES = ", stacked BYTEA"
    _FOR_UPDATE = " FOR UPDATE"

    def __init__(self, url: str, readonly: bool = False, adapter_dtype: str = "fp32"):
        super().__init__(_redacted(url), adapter_dtype)
        try:
            import psycopg
        except ImportError:
            raise MTAError("a PostgreSQL store needs psycopg 3: pip install -e '.[serve]'") from None
        self._psycopg, self._url, self._readonly = psycopg, url, readonly
        self._lock = threading.Lock()
        self._db = self._connect()
        with self._transaction() as db:
            if not readonly:
                db.execute("SELECT pg_advisory_xact_lock(7212)")  # replicas starting together: one creates the tables
                db.execute("CREATE TABLE IF NOT EXISTS mta_schema (version INTEGER NOT NULL)")
                for ddl in self._DDL:
                    db.execute(ddl.format(bytes=self._BYTES))
                if db.execute("SELECT version FROM mta_schema").fetchone() is None:
                    db.execute("INSERT INTO mta_schema VALUES (?)", (_SCHEMA_VERSION,))
            version = db.execute("SELECT version FROM mta_schema").fetchone() if _exists(db, "mta_schema") else None
            storage = db.execute("SELECT attstorage FROM pg_attribute WHERE attrelid = to_regclass('users') AND attname = 'stacked'").fetchone()
            if version is None or storage is None:
                raise MTAError(f"the database at {self.location} holds tables that are not an mta user store; give mta a database "
                               "of its own")
            if version[0] > _SCHEMA_VERSION:
                raise MTAError(f"user store {self.location} has schema {version[0]}; this mta reads up to {_SCHEMA_VERSION}: upgrade mta")
            if storage[0] != "e" and not readonly:
                # safetensors of random-looking floats do not compress: keep them out of line and uncompressed
                db.execute("ALTER TABLE users ALTER COLUMN stacked SET STORAGE EXTERNAL")

    def _connect(self):
        try:
            conn = self._psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        except self._psycopg.Error as e:
            raise MTAError(f"cannot connect to the user store at {self.location}: {_one_line(e)}") from None
        conn.read_only = self._readonly or None
        return conn

    @contextmanager
    def _transaction(self):
        with self._lock:
            if self._db.closed or self._db.broken:
                self._db = self._connect()
            try:
                with self._db.transaction():
                    yield _Placeholders(self._db)
            except self._psycopg.OperationalError as e:
                raise MTAError(f"the user store at {self.location} failed: {_one_line(e)}") from None

    def _adapter_bytes(self, user: StoredUser) -> bytes:
        with self._transaction() as db:
            row = db.execute("SELECT stacked FROM users WHERE user_id = ? AND adapter = ?", (user.record.user_id, user.adapter)).fetchone()
        if row is None:
            raise StaleUserError(f"user {user.record.user_id!r} changed while their adapter was read; retry")
        return bytes(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())  # libpq's messages span lines (a hint, a detail)


def _exists(db, table: str) -> bool:
    return db.execute("SELECT to_regclass(?)", (table,)).fetchone()[0] is not None


class _Placeholders:
    """A psycopg connection that takes the '?' placeholders the shared SQL is written with."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql: str, params: tuple = ()):
        return self._conn.execute(sql.replace("?", "%s"), params)


def _redacted(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")))
