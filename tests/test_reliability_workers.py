"""Tick workers as real processes: a killed worker's orders are taken over, SQLite refuses a
second concurrent worker, and a database failure in the middle of a tick costs one batch only.

The commands here record one row per run through ``ctx.session`` (the row commits exactly when
the state change does), so "ran exactly once" is a row count. Subprocesses load them through
``$RATEPAY_OMS_PLUGINS=tests.test_reliability_workers:register``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from ratepay_oms import Engine
from ratepay_oms.engine.claims import SqliteWorkerBusyError, SqliteWorkerLock
from ratepay_oms.engine.plugins import ByOrderCommand, CommandContext, PluginRegistry
from ratepay_oms.persistence.db import create_db_engine, upgrade
from ratepay_oms.persistence.models import Order, OrderItem, StateHistory
from tests.plugins_for_tests import order_doc

REPO_ROOT = Path(__file__).resolve().parents[1]

PROCESS = """
process: Reliability01
states:
  new:
  done:
transitions:
  - {source: new, target: done, event: work}
events:
  work: {on_enter: true, command: Reliability/Work}
"""

runs = sa.Table(
    "test_reliability_run",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item_id", sa.Integer, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)


def kill_own_connection(session: Session, admin_url: str) -> None:
    """Kill the connection ``session`` runs on, from a second connection, the way the server
    does it when an operator or a failover drops it: ``pg_terminate_backend`` on PostgreSQL,
    ``KILL <connection id>`` on MariaDB."""
    backend = session.get_bind().dialect.name
    if backend == "postgresql":
        own_id, kill = "SELECT pg_backend_pid()", "SELECT pg_terminate_backend(:p)"
    elif backend in ("mysql", "mariadb"):
        own_id, kill = "SELECT CONNECTION_ID()", "KILL :p"
    else:  # pragma: no cover - the test runs on the server dialects only
        raise AssertionError(f"no way to kill a {backend} connection")
    connection_id = session.execute(sa.text(own_id)).scalar_one()
    admin = sa.create_engine(admin_url)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(kill), {"p": connection_id})
    finally:
        admin.dispose()


class Work(ByOrderCommand):
    """Records a run; blocks forever (after touching ``$RELIABILITY_STARTED``) when
    ``$RELIABILITY_BLOCK`` is set; with ``services["kill_backend"]`` kills its own database
    connection from another connection once, mid-command (PostgreSQL or MariaDB)."""

    def run(self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]) -> None:
        ctx.session.execute(
            sa.insert(runs), [{"item_id": i.id, "pid": os.getpid()} for i in items]
        )
        ctx.session.flush()
        started = os.environ.get("RELIABILITY_STARTED")
        if started:
            Path(started).write_text(str(os.getpid()))
        if os.environ.get("RELIABILITY_BLOCK"):
            time.sleep(600)
        killer = ctx.services.get("kill_backend")
        if killer and not killer["done"]:
            killer["done"] = True
            kill_own_connection(ctx.session, killer["url"])
            # The command itself does not touch the database again; the engine's next
            # statement in this transaction finds the connection gone.


def register(registry: PluginRegistry) -> None:
    registry.register_by_order("Reliability/Work", Work())


def _registry() -> PluginRegistry:
    registry = PluginRegistry()
    register(registry)
    return registry


def _prepare(url: str, tmp_path: Path) -> Path:
    upgrade(url)
    db = create_db_engine(url)
    runs.metadata.create_all(db)
    with db.begin() as conn:
        conn.execute(sa.delete(runs))
    db.dispose()
    pdir = tmp_path / "processes"
    pdir.mkdir(exist_ok=True)
    (pdir / "Reliability01.yaml").write_text(PROCESS, encoding="utf-8")
    return pdir


def _runs(url: str) -> list[dict[str, Any]]:
    db = create_db_engine(url)
    with db.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(runs).order_by(runs.c.id))]
    db.dispose()
    return rows


def _history_count(url: str, item_ids: Sequence[int]) -> int:
    db = create_db_engine(url)
    with db.connect() as conn:
        count = conn.execute(
            sa.select(sa.func.count()).select_from(StateHistory).where(
                StateHistory.item_id.in_(list(item_ids)), StateHistory.to_state == "done"
            )
        ).scalar_one()
    db.dispose()
    return int(count)


WORKER = """
import json, sys
from ratepay_oms import Engine
engine = Engine(sys.argv[1], process_dir=sys.argv[2], lease_seconds=int(sys.argv[3]))
print(json.dumps(engine.tick().to_json()))
"""

CLI = "import sys; from ratepay_oms.cli import main; sys.exit(main())"


def _env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "RATEPAY_OMS_PLUGINS": "tests.test_reliability_workers:register",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("RELIABILITY_BLOCK", None)
    env.update(extra)
    return env


def _start_blocked_worker(
    url: str, pdir: Path, tmp_path: Path, lease: int
) -> subprocess.Popen[str]:
    started = tmp_path / f"started-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, url, str(pdir), str(lease)],
        env=_env(RELIABILITY_BLOCK="1", RELIABILITY_STARTED=str(started)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the worker never reached the command"
        time.sleep(0.05)
    return proc


def _place(url: str, pdir: Path, n: int = 1) -> tuple[Engine, list[str], list[int]]:
    engine = Engine(url, process_dir=pdir, registry=_registry())
    refs = [f"R-{uuid.uuid4().hex[:8]}" for _ in range(n)]
    ids: list[int] = []
    for ref in refs:
        view = engine.place_order(
            order_doc(ref, process="Reliability01", lines=(("SKU-A", 2),)), fire=False
        )
        ids.extend(i.id for i in view.items)
    return engine, refs, ids


def test_a_killed_workers_order_is_taken_over_at_once_and_finished_once(
    server_only_db_url: str, tmp_path: Path
) -> None:
    """Server dialects only: SQLite refuses a second worker (the lock tests below).

    A worker runs an in-transaction command inside the transaction that row-locks the order
    (no lease: leases cover gateway calls in flight). While it works, a second worker leaves
    the order alone; once the first is killed, the database rolls its transaction back and
    the order is free at once, with nothing to expire, and it is finished exactly once."""
    pdir = _prepare(server_only_db_url, tmp_path)
    engine, refs, ids = _place(server_only_db_url, pdir)
    first = _start_blocked_worker(server_only_db_url, pdir, tmp_path, 60)
    try:
        assert engine.order(refs[0]).claimed_by is None
        # While the first worker holds the order's row, a second worker leaves it alone.
        busy = engine.tick()
        assert busy.items_moved == 0 and busy.errors == 0
        assert engine.order(refs[0]).states() == {"new": 2}
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    assert _runs(server_only_db_url) == []  # the killed run never committed

    # The server notices the dead client and rolls back at once; no lease to wait for.
    deadline = time.monotonic() + 30
    while engine.order(refs[0]).states() != {"done": 2} and time.monotonic() < deadline:
        second = subprocess.run(
            [sys.executable, "-c", WORKER, server_only_db_url, str(pdir), "60"],
            env=_env(), capture_output=True, text=True, timeout=60,
        )
        assert second.returncode == 0, second.stderr
    assert engine.order(refs[0]).states() == {"done": 2}
    assert sorted(r["item_id"] for r in _runs(server_only_db_url)) == sorted(ids)  # once each
    assert engine.order(refs[0]).claimed_by is None
    assert _history_count(server_only_db_url, ids) == len(ids)
    engine.close()


def test_sqlite_refuses_a_second_concurrent_worker_with_a_clear_message(
    tmp_sqlite_url: str, tmp_path: Path
) -> None:
    pdir = _prepare(tmp_sqlite_url, tmp_path)
    engine, refs, _ = _place(tmp_sqlite_url, pdir)
    first = _start_blocked_worker(tmp_sqlite_url, pdir, tmp_path, 60)
    try:
        second = subprocess.run(
            [sys.executable, "-c", CLI, "tick", "--db", tmp_sqlite_url, "--processes", str(pdir)],
            env=_env(), capture_output=True, text=True, timeout=60,
        )
        assert second.returncode != 0
        message = second.stderr + second.stdout
        assert "another tick worker is running on this SQLite database" in message
        assert f"pid {first.pid}" in message
        assert "use PostgreSQL or MariaDB" in message
        assert "Traceback" not in message
        with pytest.raises(SqliteWorkerBusyError, match=f"pid {first.pid}"):
            engine.tick()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    # The dead worker's lock and transaction went with it: the next tick takes the order.
    assert engine.order(refs[0]).states() == {"new": 2}
    result = engine.tick()
    assert result.errors == 0
    assert engine.order(refs[0]).states() == {"done": 2}
    assert len(_runs(tmp_sqlite_url)) == 2
    engine.close()


def test_sqlite_worker_lock_is_free_again_after_release(tmp_path: Path) -> None:
    path = str(tmp_path / "x.sqlite")
    a, b = SqliteWorkerLock(path), SqliteWorkerLock(path)
    a.acquire()
    with pytest.raises(SqliteWorkerBusyError, match=f"pid {os.getpid()}"):
        b.acquire()
    a.release()
    b.acquire()  # taken over
    b.release()


def test_a_dropped_connection_mid_tick_rolls_back_that_batch_only(
    server_only_db_url: str, tmp_path: Path
) -> None:
    """The kill is ``pg_terminate_backend`` / MariaDB's ``KILL`` (see ``kill_own_connection``);
    SQLite has no connection another one could drop."""
    pdir = _prepare(server_only_db_url, tmp_path)
    engine, refs, ids = _place(server_only_db_url, pdir, n=3)
    engine.batch_size = 1  # one order per batch: the kill hits the first batch only
    engine.services["kill_backend"] = {"done": False, "url": server_only_db_url}
    first = engine.tick()  # must not raise
    assert first.errors == 1
    assert any("database error" in m and "rolled back" in m for m in first.error_messages)
    states = [engine.order(r).states() for r in refs]
    assert states.count({"new": 2}) == 1  # the killed batch: old state ...
    assert states.count({"done": 2}) == 2  # ... the others went on
    killed_ref = refs[states.index({"new": 2})]
    killed_ids = [i.id for i in engine.order(killed_ref).items]
    assert _history_count(server_only_db_url, killed_ids) == 0  # ... no history row
    assert all(i.retry_at is None and i.last_error is None
               for i in engine.order(killed_ref).items)  # ... nothing half-written
    assert engine.order(killed_ref).claimed_by is None

    second = engine.tick()
    assert second.errors == 0
    assert engine.order(killed_ref).states() == {"done": 2}
    assert sorted(r["item_id"] for r in _runs(server_only_db_url)) == sorted(ids)  # once each
    assert _history_count(server_only_db_url, ids) == len(ids)
    engine.close()
