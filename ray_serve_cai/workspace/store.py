"""Durable state of the workspace: one SQLite file (`<home>/workspace.db`, WAL) behind the in-memory records.

The service keeps its records (projects, jobs, job runs, applications) in dicts, as before; this store
is write-through. Every record class marks itself changed when an attribute is set
(`model.set_change_hook`), and `flush()` writes the changed records in one transaction. The server
flushes before every API answer leaves (so an answer a client saw is never lost), right after a
workload's process is spawned, and every `FLUSH_INTERVAL_SECONDS` for changes made in the background.

Records are stored generically, as JSON of every dataclass field (a field added to a record later is
durable with no change here); a field the database lacks takes its default on load, a stored field the
class no longer has is ignored. Writes go through one connection under one lock (the server's threads
are serialised). The schema has a version (`PRAGMA user_version`) and migrations from version 1; a
database that is damaged or was written by a newer version is refused with `StoreError`, never replaced.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ray_serve_cai.errors import OperationFailed

DB_FILE_NAME = "workspace.db"
SCHEMA_VERSION = 1
FLUSH_INTERVAL_SECONDS = 0.1

# kind -> table; the kinds are the record classes' `KIND`.
TABLES = {"project": "projects", "job": "jobs", "run": "job_runs", "app": "applications"}

# Each entry brings the schema from version N-1 to N (index 0: from an empty file to version 1).
MIGRATIONS: list[list[str]] = [
    [
        *(
            f"CREATE TABLE {table} (id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, data TEXT NOT NULL)"
            for table in TABLES.values()
        ),
        # Runtimes a job or application names: kept offered even when runtimes.json changes later.
        "CREATE TABLE runtimes_in_use (image_identifier TEXT PRIMARY KEY, data TEXT NOT NULL)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
]

R = TypeVar("R")


class StoreError(OperationFailed):
    """The workspace database cannot be used (damaged, newer schema); the message says what to do."""


def db_path(home: Path) -> Path:
    return home / DB_FILE_NAME


def to_row(record: Any) -> str:
    """Every dataclass field of `record` as JSON (paths as strings)."""
    data = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    return json.dumps(data, default=_json_default, separators=(",", ":"))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__}")


def from_row(cls: type[R], raw: str) -> R:
    """A record of `cls` from its JSON: unknown keys ignored, missing ones take their defaults."""
    data = json.loads(raw)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data or not f.init:
            continue
        value = data[f.name]
        if value is not None and "Path" in str(f.type):
            value = Path(value)
        kwargs[f.name] = value
    return cls(**kwargs)


class Store:
    """The SQLite file of one workspace home. Thread-safe; every method commits before it returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Insertion-ordered: a record's first mark is its creation, so new rows get `seq` in creation order.
        self._dirty: dict[tuple[str, str], None] = {}
        self._seq: dict[str, int] = {}
        self._next_seq = 1
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the workspace database {path}: {exc}") from None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(
                f"the workspace database {path} is damaged ({exc}); it was left as it is. "
                "Move it away to keep it, or start afresh with `ray-cai workspace reset`"
            ) from None
        except StoreError:
            self._db.close()
            raise

    def _open(self) -> None:
        db = self._db
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"the workspace database {self.path} has schema version {version}, newer than this "
                f"ray-serve-cai understands ({SCHEMA_VERSION}); upgrade ray-serve-cai, or start afresh "
                "with `ray-cai workspace reset`"
            )
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {check}")
        if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(
                f"{self.path} is an SQLite file but not a workspace database; it was left as it is"
            )
        db.execute("PRAGMA journal_mode=WAL")
        # Durable against a crash of the server (the case that matters); a power loss may lose the
        # last commits (documented in the README).
        db.execute("PRAGMA synchronous=NORMAL")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self._transaction():
                for statement in MIGRATIONS[target - 1]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
        for table in TABLES.values():
            for record_id, seq in db.execute(f"SELECT id, seq FROM {table}"):
                self._seq[record_id] = seq
                self._next_seq = max(self._next_seq, seq + 1)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ reading

    def load(self, kind: str, cls: type[R]) -> list[R]:
        """Every stored record of `kind`, in creation order."""
        with self._lock:
            rows = self._db.execute(f"SELECT data FROM {TABLES[kind]} ORDER BY seq").fetchall()
        return [from_row(cls, raw) for (raw,) in rows]

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def runtimes_in_use(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM runtimes_in_use ORDER BY image_identifier").fetchall()
        return [json.loads(raw) for (raw,) in rows]

    def keep_runtime(self, runtime: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO runtimes_in_use (image_identifier, data) VALUES (?, ?)",
                (runtime["image_identifier"], json.dumps(runtime)),
            )

    # ------------------------------------------------------------ writing

    def mark(self, kind: str, record_id: str) -> None:
        """Record `kind`/`record_id` as changed (created, modified or removed); `flush` writes it."""
        with self._lock:
            self._dirty.setdefault((kind, record_id))

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def flush(self, lookup: Callable[[str, str], Any | None], meta: Iterable[tuple[str, str]] = ()) -> int:
        """Write every changed record (`lookup` gives the live record, None when it was removed) and
        `meta` pairs in one transaction; returns how many records were written."""
        with self._lock:
            if not self._dirty:
                return 0
            dirty, self._dirty = self._dirty, {}
            try:
                with self._transaction():
                    for kind, record_id in dirty:
                        table = TABLES[kind]
                        record = lookup(kind, record_id)
                        if record is None:
                            self._db.execute(f"DELETE FROM {table} WHERE id = ?", (record_id,))
                            self._seq.pop(record_id, None)
                            continue
                        seq = self._seq.get(record_id)
                        if seq is None:
                            seq = self._seq[record_id] = self._next_seq
                            self._next_seq += 1
                        self._db.execute(
                            f"INSERT INTO {table} (id, seq, data) VALUES (?, ?, ?) "
                            "ON CONFLICT(id) DO UPDATE SET data = excluded.data",
                            (record_id, seq, to_row(record)),
                        )
                    for key, value in meta:
                        self._db.execute(
                            "INSERT INTO meta (key, value) VALUES (?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                            (key, value),
                        )
            except BaseException:
                self._dirty = {**dirty, **self._dirty}  # nothing was written: try again next time
                raise
            return len(dirty)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
