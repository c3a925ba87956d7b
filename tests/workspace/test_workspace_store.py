"""The workspace's SQLite store on its own: generic records, schema version, refusals, committed writes."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ray_serve_cai.workspace.model import Application, Record
from ray_serve_cai.workspace.store import SCHEMA_VERSION, Store, StoreError, from_row, to_row


@dataclasses.dataclass
class ExtendedApp(Application):
    """An Application with a field another module adds later (e.g. a listener port)."""

    KIND: ClassVar[str] = "app"
    added_later: int | None = None


def app(**fields: Any) -> Application:
    base = {"id": "a1", "project_id": "p1", "name": "n", "subdomain": "s", "script": "x.py"}
    return Application(**{**base, "log_path": Path("/tmp/x.log"), **fields})


def test_every_field_round_trips_including_one_added_later(tmp_path: Path) -> None:
    extended = ExtendedApp(
        id="a1", project_id="p1", name="n", subdomain="s", script="x.py", log_path=tmp_path / "a.log"
    )
    extended.added_later, extended.app_port, extended.environment = 41234, 40000, {"K": "v"}
    store = Store(tmp_path / "w.db")
    store.mark("app", extended.id)
    store.flush(lambda kind, record_id: extended)
    store.close()
    loaded = Store(tmp_path / "w.db").load("app", ExtendedApp)
    assert loaded == [extended] and isinstance(loaded[0].log_path, Path)
    # Read by the class without the field: the unknown stored field is ignored, nothing fails.
    plain = from_row(Application, to_row(extended))
    assert plain.app_port == 40000 and not hasattr(plain, "added_later")
    # And a row written before the field existed takes its default.
    assert from_row(ExtendedApp, to_row(app())).added_later is None


def test_records_keep_creation_order_and_removals_are_written(tmp_path: Path) -> None:
    store = Store(tmp_path / "w.db")
    records = {f"a{i}": app(id=f"a{i}", subdomain=f"s{i}") for i in (3, 1, 2)}
    for record_id in records:
        store.mark("app", record_id)
    store.flush(lambda kind, record_id: records.get(record_id))
    records["a4"] = app(id="a4", subdomain="s4")
    store.mark("app", "a4")
    del records["a1"]
    store.mark("app", "a1")
    store.flush(lambda kind, record_id: records.get(record_id))
    ids = [r.id for r in Store(tmp_path / "w.db").load("app", Application)]
    assert ids == ["a3", "a2", "a4"]  # creation (first mark) order, the removed one gone


def test_setting_an_attribute_marks_the_record(tmp_path: Path) -> None:
    from ray_serve_cai.workspace.model import set_change_hook

    seen: list[tuple[str, str]] = []
    set_change_hook(lambda kind, record_id: seen.append((kind, record_id)))
    try:
        record = app()
        seen.clear()
        record.status = "APPLICATION_RUNNING"
    finally:
        set_change_hook(None)
    assert seen == [("app", "a1")] and isinstance(record, Record)


def test_a_new_file_gets_the_current_schema_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "w.db").close()
    with sqlite3.connect(tmp_path / "w.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this ray-serve-cai understands"):
        Store(tmp_path / "w.db")


def test_damaged_or_foreign_files_are_refused_and_left_alone(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(StoreError, match="damaged"):
        Store(damaged)
    assert damaged.read_bytes() == b"\x00garbage" * 1000
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE mine (x)")
    with pytest.raises(StoreError, match="not a workspace database"):
        Store(foreign)
