"""One connection per thread for a drive's consecutive transactions (``Drive.connected``):
a tick's batches and the chains they start check out one connection instead of one per
transaction, yet no transaction is open while a gateway call is in flight, and a database
error hands the connection back (the next transaction runs on a fresh one, nothing of the
failed one is kept).

Uses the two-call test process of ``test_drive_concurrency`` (``new`` → ``first`` →
``second`` → ``done``, a call on entering ``first`` and ``second``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from ratepay_oms import Engine
from ratepay_oms.engine.plugins import CallContext, PluginRegistry, PreparedCall
from ratepay_oms.engine.runner import LoopGuard, Runner, RunStats
from ratepay_oms.persistence.db import PING_AFTER_IDLE_SECONDS, upgrade
from ratepay_oms.persistence.models import Intent, Order
from tests.test_drive_concurrency import PROCESS, Call, Gateway, _engine, _place


@pytest.fixture
def world(fresh_db_url: str, tmp_path: Path) -> Iterator[tuple[Engine, Gateway]]:
    engine, gateway = _engine(fresh_db_url, tmp_path, 60)
    yield engine, gateway
    engine.close()


class _Watch:
    """Pool checkouts and the connections with a transaction open, per thread."""

    def __init__(self, engine: Engine) -> None:
        self.db = engine.db
        self.checkouts = 0
        self.open: dict[int, int] = {}
        """id(connection) -> thread that began its transaction."""
        self.lock = threading.Lock()

    def __enter__(self) -> _Watch:
        event.listen(self.db, "checkout", self._checkout)
        event.listen(self.db, "begin", self._begin)
        event.listen(self.db, "commit", self._end)
        event.listen(self.db, "rollback", self._end)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.db, "checkout", self._checkout)
        event.remove(self.db, "begin", self._begin)
        event.remove(self.db, "commit", self._end)
        event.remove(self.db, "rollback", self._end)

    def _checkout(self, *args: Any) -> None:
        with self.lock:
            self.checkouts += 1

    def _begin(self, conn: Any) -> None:
        with self.lock:
            self.open[id(conn)] = threading.get_ident()

    def _end(self, conn: Any) -> None:
        with self.lock:
            self.open.pop(id(conn), None)

    def open_here(self) -> int:
        me = threading.get_ident()
        with self.lock:
            return sum(1 for thread in self.open.values() if thread == me)


def test_a_tick_runs_its_transactions_on_one_connection_none_open_during_a_call(
    world: tuple[Engine, Gateway],
) -> None:
    """Four orders, twelve transactions (a batch and two settles each), at concurrency 1 all
    on the tick's thread: a handful of checkouts (the probe, the window, the kept connection),
    not one per transaction; and while each call is in flight the thread has no transaction
    open on any connection."""
    engine, gateway = world
    refs = _place(engine, 4)
    during_calls: list[int] = []
    with _Watch(engine) as watch:
        gateway.lease_check = lambda ref: during_calls.append(watch.open_here())
        result = engine.tick(concurrency=1)
    assert result.errors == 0, result.error_messages
    assert all(engine.order(r).states() == {"done": 1} for r in refs)
    assert during_calls == [0] * 8
    assert watch.checkouts <= 4, watch.checkouts


def test_chains_on_the_pool_keep_their_calls_outside_transactions(
    world: tuple[Engine, Gateway],
) -> None:
    """With the pool each chain keeps a connection of its own on its thread: still no
    transaction open on it while its calls are in flight."""
    engine, gateway = world
    refs = _place(engine, 6)
    during_calls: list[int] = []
    with _Watch(engine) as watch:
        gateway.lease_check = lambda ref: during_calls.append(watch.open_here())
        result = engine.tick(concurrency=3)
    assert result.errors == 0, result.error_messages
    assert all(engine.order(r).states() == {"done": 1} for r in refs)
    assert during_calls == [0] * 12
    assert not watch.open


def _set_customer(ref: str, value: str) -> Any:
    def work(runner: Runner) -> None:
        runner.session.execute(
            update(Order).where(Order.order_ref == ref).values(customer_ref=value)
        )

    return work


def _customer(engine: Engine, ref: str) -> str | None:
    with engine.session() as session:
        return session.scalar(select(Order.customer_ref).where(Order.order_ref == ref))


def test_a_database_error_hands_the_kept_connection_back(
    world: tuple[Engine, Gateway],
) -> None:
    """A transaction that fails in the database is rolled back (its write is gone) and its
    connection goes back to the pool; the next transaction checks out a fresh one and
    commits. Transactions that succeed keep the one connection."""
    engine, _gateway = world
    (ref,) = _place(engine, 1)
    drive = engine._drive(datetime(2026, 1, 1), RunStats())

    def broken(runner: Runner) -> None:
        _set_customer(ref, "lost")(runner)
        runner.session.execute(text("SELECT no_such_column FROM oms_order"))

    with _Watch(engine) as watch, drive.connected():
        drive.transact(_set_customer(ref, "first"), LoopGuard())
        drive.transact(_set_customer(ref, "second"), LoopGuard())
        assert watch.checkouts == 1
        with pytest.raises(SQLAlchemyError):
            drive.transact(broken, LoopGuard())
        assert _customer(engine, ref) == "second"
        checked = watch.checkouts
        drive.transact(_set_customer(ref, "third"), LoopGuard())
        assert watch.checkouts == checked + 1
        drive.transact(_set_customer(ref, "fourth"), LoopGuard())
        assert watch.checkouts == checked + 1
        assert not watch.open
    assert _customer(engine, ref) == "fourth"
    assert engine.db.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_kept_connection_idle_too_long_is_pinged_and_replaced_when_dead(
    world: tuple[Engine, Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a slow gateway call the kept connection is pinged first, as the pool pings a
    connection it hands out after ``PING_AFTER_IDLE_SECONDS``; a dead one is replaced and
    the transaction runs on a fresh connection instead of failing."""
    engine, _gateway = world
    (ref,) = _place(engine, 1)
    drive = engine._drive(datetime(2026, 1, 1), RunStats())
    dialect = engine.db.dialect
    pings: list[object] = []

    def dead(dbapi_connection: object) -> bool:
        pings.append(dbapi_connection)
        raise dialect.loaded_dbapi.OperationalError("server closed the connection")

    with _Watch(engine) as watch, drive.connected():
        drive.transact(_set_customer(ref, "first"), LoopGuard())
        drive.transact(_set_customer(ref, "second"), LoopGuard())  # not idle: no ping
        assert watch.checkouts == 1
        monkeypatch.setattr(dialect, "do_ping", dead)
        drive._local.line.used -= PING_AFTER_IDLE_SECONDS + 1  # as after a slow call
        drive.transact(_set_customer(ref, "third"), LoopGuard())
        assert len(pings) == 1
        assert watch.checkouts == 2
        monkeypatch.undo()
    assert _customer(engine, ref) == "third"


class _Remembering(Call):
    """Remembers a fact about the call before it goes on, as PAYMENT_REQUEST remembers the
    transaction id PAYMENT_INIT gave."""

    def send(self, call: PreparedCall[dict[str, str]], io: CallContext) -> str:
        io.remember({"seen": call.payload["state"]})
        return super().send(call, io)


def test_a_remembered_fact_is_committed_before_the_call_goes_on(
    fresh_db_url: str, tmp_path: Path
) -> None:
    """The summary the call remembers (on the thread's kept connection: in autocommit on
    PostgreSQL, a transaction of its own elsewhere) is visible to another connection while
    the call is still in flight, for each of an order's two calls."""
    upgrade(fresh_db_url)
    pdir = tmp_path / "processes"
    pdir.mkdir()
    (pdir / "Drive01.yaml").write_text(PROCESS, encoding="utf-8")
    registry = PluginRegistry()
    registry.register_external("Drive/Call", _Remembering())
    gateway = Gateway()
    engine = Engine(fresh_db_url, process_dir=pdir, registry=registry,
                    services={"gateway": gateway}, lease_seconds=60)
    try:
        refs = _place(engine, 2)
        seen: list[tuple[str, tuple[str, ...]]] = []
        with engine.session() as session:
            rows = session.execute(
                select(Order.id, Order.order_ref).where(Order.order_ref.in_(refs))
            )
            ids = {order_id: ref for order_id, ref in rows}

        def look(ref: str) -> None:  # from another connection, during the call
            with engine.session() as session:
                rows = session.execute(
                    select(Intent.order_id, Intent.summary).where(Intent.order_id.in_(ids))
                )
                facts = [json.loads(summary).get("seen") for order_id, summary in rows
                         if ids[order_id] == ref]
            seen.append((ref, tuple(sorted(f for f in facts if f))))

        gateway.lease_check = look
        with _Watch(engine) as watch:
            result = engine.tick(concurrency=1)
        assert result.errors == 0, result.error_messages
        # The call's own intent has its fact (the first call's intent keeps its own).
        assert sorted(seen) == sorted(
            (r, s) for r in refs for s in (("new",), ("first", "new"))
        )
        assert all(engine.order(r).states() == {"done": 1} for r in refs)
        assert not watch.open
    finally:
        engine.close()
