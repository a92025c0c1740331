"""The server's user store: SQLite rows for users, profiles and fusion records; safetensors files for stacked LoRAs.

Layout::

    <store>/users.db                        one row per user: UserRecord JSON (fusion record, stack figures),
                                            profile JSON, the name of their adapter file, a version
    <store>/adapters/<random>.safetensors   one stacked LoRA per file, written once and never changed

Why it survives a kill at any instant: an adapter file is complete on disk (temp file, fsync, rename)
*before* the SQLite transaction that points a user at it commits, and a replaced file is deleted only
*after* that commit. So a reader sees the old state or the new one, never a mix; the worst leftover is an
unreferenced file, which opening the store deletes. One process owns a store at a time (a lock file).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mta.adapters import LoraWeights
from mta.data.lamp import check_user_id
from mta.io import MTAError, atomic_save_tensors, load_tensors
from mta.stacking import UserRecord

_SCHEMA_VERSION = 1


class StaleUserError(MTAError):
    """The user changed while a job worked from an older copy: its result no longer applies."""


@dataclass(frozen=True)
class StoredUser:
    record: UserRecord
    profile: list[dict]
    adapter: str | None  # file name of the stacked LoRA under adapters/, None before adaptation
    version: int  # bumped by every write; an adapt job commits only onto the version it trained from


class UserStore:
    def __init__(self, path: str | Path, readonly: bool = False):
        """`readonly` reads a store that a live server may be writing (WAL readers never block the writer)."""
        self.path = Path(path)
        self.adapters_dir = self.path / "adapters"
        self._lock = threading.Lock()
        self._lock_file = None
        if readonly:
            if not (self.path / "users.db").is_file():
                raise MTAError(f"{self.path} is not a user store (no users.db)")
            self._db = sqlite3.connect(f"file:{self.path / 'users.db'}?mode=ro", uri=True, check_same_thread=False)
            self._check_schema()
            return
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise MTAError(f"user store {self.path} is in use by another process") from None
        self._db = sqlite3.connect(self.path / "users.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._check_schema()
        self._db.execute("""CREATE TABLE IF NOT EXISTS users (
            user_id TEXT PRIMARY KEY, record TEXT NOT NULL, profile TEXT NOT NULL, adapter TEXT,
            version INTEGER NOT NULL, updated REAL NOT NULL)""")
        self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        self._remove_orphans()

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

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()

    def __enter__(self) -> "UserStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def user_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT user_id FROM users ORDER BY user_id")]

    def get(self, user_id: str) -> StoredUser | None:
        with self._lock:
            row = self._db.execute("SELECT record, profile, adapter, version FROM users WHERE user_id = ?",
                                   (check_user_id(user_id),)).fetchone()
        if row is None:
            return None
        record = UserRecord.from_dict(json.loads(row[0]), f"user {user_id!r} in {self.path / 'users.db'}")
        return StoredUser(record, json.loads(row[1]), row[2], row[3])

    def put(self, record: UserRecord, profile: list[dict]) -> StoredUser:
        """Create or replace a user. A new profile drops the stacked LoRA: it was trained on the old one."""
        check_user_id(record.user_id)
        if record.stack is not None:
            raise MTAError("put() stores a profile and its fusion; a stacked LoRA comes with set_stacked()")
        return self._write(record, profile, None, expected_version=None)

    def set_stacked(self, record: UserRecord, stacked: LoraWeights, expected_version: int) -> StoredUser:
        """Attach a trained stacked LoRA, unless the user changed since `expected_version` (StaleUserError)."""
        current = self.get(record.user_id)
        if current is None:
            raise StaleUserError(f"user {record.user_id!r} was removed while their adapter trained")
        name = f"{uuid.uuid4().hex}.safetensors"
        path = self.adapters_dir / name
        atomic_save_tensors(path, stacked.peft_state_dict(), metadata={"format": "mta-stacked-lora", "scaling": "folded"})
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # durable before any row may point at it
        try:
            return self._write(record, current.profile, name, expected_version)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _write(self, record: UserRecord, profile: list[dict], adapter: str | None, expected_version: int | None) -> StoredUser:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT adapter, version FROM users WHERE user_id = ?", (record.user_id,)).fetchone()
                old_adapter, version = row if row else (None, 0)
                if expected_version is not None and version != expected_version:
                    raise StaleUserError(f"user {record.user_id!r} changed while their adapter trained (version "
                                         f"{expected_version} → {version}); adapt again")
                self._db.execute("INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?, ?)",
                                 (record.user_id, json.dumps(record.to_dict(), sort_keys=True), json.dumps(profile),
                                  adapter, version + 1, time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if old_adapter and old_adapter != adapter:
            (self.adapters_dir / old_adapter).unlink(missing_ok=True)
        return StoredUser(record, profile, adapter, version + 1)

    def stacked(self, user: StoredUser) -> LoraWeights | None:
        """The user's stacked LoRA factors (scaling folded in), or None before adaptation."""
        if user.adapter is None:
            return None
        tensors = load_tensors(self.adapters_dir / user.adapter)
        return LoraWeights.from_peft_state_dict(tensors, {"r": 1, "lora_alpha": 1}, str(self.adapters_dir / user.adapter))
