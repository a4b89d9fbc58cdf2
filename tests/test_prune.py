"""Pruning: only finished orders lose rows, only rows older than the cutoff, in batches; the
archive holds exactly what was removed; a dry run removes nothing."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from ratepay_oms import Engine
from ratepay_oms.cli import main
from ratepay_oms.console.prune import PruneError, Pruner, read_archive
from ratepay_oms.engine.outbox import NotificationSettings
from ratepay_oms.persistence.db import create_db_engine
from ratepay_oms.persistence.models import (
    ApiLogEntry,
    OutboxEntry,
    StateHistory,
    TransitionLog,
)
from tests.plugins_for_tests import make_registry, order_doc, prepare_database

PROCESS = """
process: Prune01
states:
  new:
  open:
  done: {notify: true}
transitions:
  - {source: new, target: open, event: start}
  - {source: open, target: done, event: finish}
events:
  start: {on_enter: true}
  finish: {manual: true}
"""

NOW = datetime(2026, 6, 1, 12, 0, 0)
TABLES = {
    "oms_state_history": StateHistory,
    "oms_transition_log": TransitionLog,
    "ratepay_api_log": ApiLogEntry,
    "oms_outbox": OutboxEntry,
}


@pytest.fixture(autouse=True)
def _cli_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATEPAY_OMS_PLUGINS", "tests.plugins_for_tests:register")


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    d = tmp_path / "processes"
    d.mkdir()
    (d / "Prune01.yaml").write_text(PROCESS, encoding="utf-8")
    return d


def _order(engine: Engine, placed: datetime, finished: datetime | None, items: int = 2) -> str:
    ref = f"P-{uuid.uuid4().hex[:8]}"
    engine.place_order(order_doc(ref, process="Prune01", lines=(("SKU", items),)), now=placed)
    if finished is not None:
        engine.trigger("finish", ref, now=finished)
    with engine.session() as session, session.begin():
        # PAYMENT_INIT has only the transaction id; later calls have the order reference too.
        session.add(ApiLogEntry(created_at=placed, operation="PAYMENT_INIT", order_ref=None,
                                transaction_id=f"TX-{ref}", success=True, duration_ms=5))
        session.add_all(
            ApiLogEntry(created_at=placed + timedelta(minutes=m), operation="PAYMENT_REQUEST",
                        order_ref=ref, transaction_id=f"TX-{ref}", success=True, duration_ms=5)
            for m in (1, 2)
        )
    return ref


def _ids(url: str) -> dict[str, set[int]]:
    db = create_db_engine(url)
    try:
        with db.connect() as conn:
            return {
                name: set(conn.execute(sa.select(model.id)).scalars())
                for name, model in TABLES.items()
            }
    finally:
        db.dispose()


def _setup(url: str, pdir: Path) -> tuple[Engine, dict[str, str]]:
    prepare_database(url)
    engine = Engine(url, process_dir=pdir, registry=make_registry(),
                    notifications=NotificationSettings())
    old = NOW - timedelta(days=500)
    refs = {
        "finished long ago": _order(engine, old, NOW - timedelta(days=400)),
        "finished lately": _order(engine, old, NOW - timedelta(days=10)),
        "still open": _order(engine, old, None),
        "finished long ago 2": _order(engine, old, NOW - timedelta(days=380), items=1),
    }
    with engine.session() as session, session.begin():
        session.add(ApiLogEntry(created_at=old, operation="PROFILE_REQUEST", success=True,
                                duration_ms=3))
        session.add(ApiLogEntry(created_at=NOW, operation="PROFILE_REQUEST", success=True,
                                duration_ms=3))
        # Delivered notifications can go; a pending one never does.
        session.execute(sa.update(OutboxEntry).values(status="delivered"))
        pending = session.scalars(sa.select(OutboxEntry).order_by(OutboxEntry.id)).first()
        assert pending is not None
        pending.status = "pending"
    return engine, refs


def _rows_of(url: str, refs: list[str]) -> dict[str, set[int]]:
    """Ids per table that belong to the orders ``refs``."""
    db = create_db_engine(url)
    try:
        with db.connect() as conn:
            order_ids = list(conn.execute(
                sa.text("SELECT id FROM oms_order WHERE order_ref IN :r").bindparams(
                    sa.bindparam("r", expanding=True)), {"r": refs}).scalars())
            found = {}
            for name, model in TABLES.items():
                where = (model.transaction_id.in_([f"TX-{r}" for r in refs])
                         if model is ApiLogEntry else model.order_id.in_(order_ids))
                found[name] = set(conn.execute(sa.select(model.id).where(where)).scalars())
            return found
    finally:
        db.dispose()


def test_prune_removes_old_rows_of_finished_orders_only_and_archives_them(
    fresh_db_url: str, pdir: Path, tmp_path: Path
) -> None:
    engine, refs = _setup(fresh_db_url, pdir)
    before = _ids(fresh_db_url)
    done = [refs["finished long ago"], refs["finished long ago 2"]]
    doomed = _rows_of(fresh_db_url, done)
    pending_outbox = min(before["oms_outbox"])
    doomed["oms_outbox"].discard(pending_outbox)
    orderless_old = min(before["ratepay_api_log"] - _rows_of(fresh_db_url, list(refs.values()))[
        "ratepay_api_log"])
    doomed["ratepay_api_log"].add(orderless_old)
    # 2 + 1 items: 3 history rows each (new, open, done), log rows for the 2 moves each.
    assert len(doomed["oms_state_history"]) == 9 and len(doomed["oms_transition_log"]) == 6
    assert len(doomed["ratepay_api_log"]) == 2 * 3 + 1  # each order's init + 2, one orderless

    pruner = Pruner(engine.session, engine.definitions(), order_batch=1, row_batch=2)
    cutoff = NOW - timedelta(days=365)
    dry = pruner.run(cutoff, dry_run=True)
    assert dry.orders == 2
    assert dry.removed == {name: len(doomed[table]) for name, table in zip(
        ("history", "log", "api-log", "outbox"), TABLES, strict=True)}
    assert _ids(fresh_db_url) == before

    archive = tmp_path / "pruned.jsonl.gz"
    report = pruner.run(cutoff, archive=archive)
    assert report.removed == dry.removed
    after = _ids(fresh_db_url)
    for table in TABLES:
        assert after[table] == before[table] - doomed[table], table
    archived: dict[str, list[int]] = {}
    for table, row in read_archive(archive):
        archived.setdefault(table, []).append(row["id"])
    assert {t: set(v) for t, v in archived.items() if v} == {
        t: v for t, v in doomed.items() if v}
    assert all(c == 1 for v in archived.values() for c in Counter(v).values())
    first = next(r for t, r in read_archive(archive) if t == "oms_state_history")
    assert set(first) == {c.name for c in StateHistory.__table__.columns}
    datetime.fromisoformat(first["created_at"])
    # Nothing left to do, and the archive is never overwritten.
    assert pruner.run(cutoff).total == 0
    with pytest.raises(PruneError, match="exists already"):
        pruner.run(cutoff, archive=archive)


def test_prune_what_limits_the_tables_and_the_cli_reports_json(
    fresh_db_url: str, pdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _setup(fresh_db_url, pdir)
    before = _ids(fresh_db_url)
    args = ["prune", "--db", fresh_db_url, "--processes", str(pdir), "--older-than", "365d",
            "--now", NOW.isoformat(), "--what", "history", "--json"]
    assert main([*args, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["removed"] == {"history": 9} and dry["dry_run"] and dry["orders"] == 2
    assert _ids(fresh_db_url) == before
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == {"history": 9}
    after = _ids(fresh_db_url)
    assert len(before["oms_state_history"] - after["oms_state_history"]) == 9
    assert {t: v for t, v in after.items() if t != "oms_state_history"} == {
        t: v for t, v in before.items() if t != "oms_state_history"}

    assert main([*args[:-3], "--what", "history,logs"]) == 1
    assert "unknown --what logs" in capsys.readouterr().err
    assert main([*args[:-3], "--older-than", "soon"]) == 2
    assert "not an age" in capsys.readouterr().err
    archive = tmp_path / "a.jsonl.gz"
    archive.write_bytes(b"")
    assert main([*args, "--archive", str(archive)]) == 1
    assert "exists already" in capsys.readouterr().err
