"""The Alembic revisions build exactly the schema the models describe, on every dialect."""

from __future__ import annotations

import importlib
import json
import pkgutil
from datetime import datetime

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, insert, inspect, select, text

import ratepay_oms.persistence
from ratepay_oms.persistence.base import Base
from ratepay_oms.persistence.db import (
    SCHEMA_HEAD,
    create_db_engine,
    current_revision,
    default_database_url,
    head_revision,
    schema_problem,
    upgrade,
)
from ratepay_oms.persistence.models import Intent

for _module in pkgutil.iter_modules(ratepay_oms.persistence.__path__):
    importlib.import_module(f"ratepay_oms.persistence.{_module.name}")

OMS_TABLES = {
    "oms_order",
    "oms_order_item",
    "oms_state_history",
    "oms_transition_log",
    "oms_event_timeout",
    "ratepay_api_log",
}


def _differences(url: str) -> list[object]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    # Tests create tables of their own (``test_*``) in the shared session database.
    return [
        d
        for d in diffs
        if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name.startswith("test_"))
    ]


def test_upgrade_reaches_head_and_matches_the_models(server_db_url: str) -> None:
    upgrade(server_db_url)
    upgrade(server_db_url)  # idempotent: a second run is a no-op

    assert current_revision(server_db_url) == head_revision()
    engine = create_db_engine(server_db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("oms_order_item")}
    finally:
        engine.dispose()
    assert tables >= OMS_TABLES
    assert {
        "ix_oms_order_item_process_state",
        "ix_oms_order_item_retry_at",
        "ix_oms_order_item_order_id",
    } <= indexes
    assert _differences(server_db_url) == []


def test_downgrade_to_base_and_back(tmp_sqlite_url: str) -> None:
    from alembic import command

    from ratepay_oms.persistence.db import _alembic_config

    upgrade(tmp_sqlite_url)
    command.downgrade(_alembic_config(tmp_sqlite_url), "base")
    assert current_revision(tmp_sqlite_url) is None
    engine = create_db_engine(tmp_sqlite_url)
    try:
        assert not (set(inspect(engine).get_table_names()) & OMS_TABLES)
    finally:
        engine.dispose()
    upgrade(tmp_sqlite_url)
    assert _differences(tmp_sqlite_url) == []


def test_empty_database_has_no_revision(tmp_sqlite_url: str) -> None:
    assert current_revision(tmp_sqlite_url) is None


def test_the_tick_s_schema_head_is_alembic_s_head() -> None:
    """The tick's start-up check compares against ``SCHEMA_HEAD`` without loading Alembic; a
    new migration must move it too, or every tick would ask for an upgrade it cannot do."""
    assert head_revision() == SCHEMA_HEAD


def test_schema_check_agrees_with_alembic_and_names_what_to_do(tmp_sqlite_url: str) -> None:
    engine = create_db_engine(tmp_sqlite_url)
    try:
        assert "has no ratepay-oms schema" in (schema_problem(engine) or "")
        upgrade(tmp_sqlite_url)
        assert current_revision(tmp_sqlite_url) == SCHEMA_HEAD
        assert schema_problem(engine) is None
        with engine.begin() as conn:  # two rows: a branched history nobody merged
            conn.execute(text("INSERT INTO alembic_version (version_num) VALUES ('0009')"))
        problem = schema_problem(engine) or ""
        assert "several schema revisions" in problem and "0009" in problem, problem
    finally:
        engine.dispose()


def test_sqlite_connections_use_wal_foreign_keys_and_savepoints(tmp_sqlite_url: str) -> None:
    engine = create_db_engine(tmp_sqlite_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
            nested = conn.begin_nested()
            conn.execute(text("INSERT INTO t VALUES (2)"))
            nested.rollback()
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 1
    finally:
        engine.dispose()


def test_default_url_comes_from_the_environment(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RATEPAY_OMS_DATABASE_URL", "postgresql+psycopg://u@h/db")
    assert default_database_url() == "postgresql+psycopg://u@h/db"
    monkeypatch.delenv("RATEPAY_OMS_DATABASE_URL")
    assert default_database_url() == "sqlite:///ratepay-oms.sqlite"


def test_item_id_lists_of_a_10000_unit_order_fit(server_db_url: str) -> None:
    """An intent of a 10,000-unit order stores ~70 KB of item ids: over MariaDB's 64 KiB
    ``TEXT`` before revision 0010 ("Data too long"), so such an order could not be placed."""
    upgrade(server_db_url)
    ids = json.dumps(list(range(1_000_000, 1_010_000)))
    assert len(ids) > 65_535
    engine = create_db_engine(server_db_url)
    try:
        with engine.begin() as conn:
            intent_id = conn.execute(
                insert(Intent.__table__).returning(Intent.__table__.c.id),
                {"order_id": 1, "process": "P", "state": "s", "command": "c", "item_ids": ids,
                 "summary": "{}", "status": "pending", "attempts": 0,
                 "created_at": datetime(2026, 12, 2)},
            ).scalar_one()
            stored = conn.execute(
                select(Intent.__table__.c.item_ids).where(Intent.__table__.c.id == intent_id)
            ).scalar_one()
            conn.execute(delete(Intent.__table__).where(Intent.__table__.c.id == intent_id))
    finally:
        engine.dispose()
    assert json.loads(stored) == list(range(1_000_000, 1_010_000))
