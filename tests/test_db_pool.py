"""The pool's liveness check on PostgreSQL and MariaDB: a connection idle for longer than
``PING_AFTER_IDLE_SECONDS`` is pinged at checkout and replaced when the server dropped it; one
handed back a moment ago is used without a round trip, and when it died in that moment its
first statement fails as a disconnect, after which the pool connects afresh.

Connections are killed for real, from a second connection (``pg_terminate_backend`` /
``KILL``). Pings are counted with a logging handler on the module's "pinging" record; pool
replacements with SQLAlchemy's ``invalidate`` and ``connect`` pool events.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError, DisconnectionError

from ratepay_oms import Engine
from ratepay_oms.engine.plugins import (
    CallContext,
    CommandContext,
    PluginRegistry,
    PreparedCall,
    Reconciled,
)
from ratepay_oms.persistence import db as db_module
from ratepay_oms.persistence.db import PING_AFTER_IDLE_SECONDS, create_db_engine, upgrade
from ratepay_oms.persistence.models import Order, OrderItem
from tests.plugins_for_tests import order_doc
from tests.test_drive_concurrency import PROCESS as DRIVE_PROCESS
from tests.test_drive_concurrency import Call, Gateway
from tests.test_reliability_workers import _history_count, _place, _prepare, _runs


def _own_id(conn: sa.Connection) -> int:
    query = "SELECT pg_backend_pid()" if conn.dialect.name == "postgresql" else (
        "SELECT CONNECTION_ID()"
    )
    return int(conn.execute(sa.text(query)).scalar_one())


def _kill(url: str, connection_id: int) -> None:
    """Drop a connection from another one, the way an operator or a failover does, and wait
    until the server has really let go of it (``pg_terminate_backend`` only signals)."""
    admin = sa.create_engine(url)
    try:
        with admin.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": connection_id})
                alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = :p"
            else:
                conn.execute(sa.text(f"KILL {int(connection_id)}"))
                alive = "SELECT count(*) FROM information_schema.processlist WHERE id = :p"
            deadline = time.monotonic() + 10
            while conn.execute(sa.text(alive), {"p": connection_id}).scalar_one():
                assert time.monotonic() < deadline, f"connection {connection_id} still there"
                time.sleep(0.02)
    finally:
        admin.dispose()


class PoolWatch:
    """What the pool did, from real listeners: pings (the module's debug record), connections
    opened (``connect``) and connections dropped (``invalidate``, with its reason)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.connects = 0
        self.invalidated: list[BaseException | None] = []
        self.pings = 0
        event.listen(engine, "connect", self._connect)
        event.listen(engine, "invalidate", self._invalidate)

    def _connect(self, _dbapi: Any, _record: Any) -> None:
        self.connects += 1

    def _invalidate(self, _dbapi: Any, _record: Any, exc: BaseException | None) -> None:
        self.invalidated.append(exc)


class _PingCounter(logging.Handler):
    def __init__(self, watch: PoolWatch) -> None:
        super().__init__(logging.DEBUG)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("pinging a database connection idle for"):
            self.watch.pings += 1


@pytest.fixture
def watched(server_only_db_url: str) -> Iterator[tuple[sa.Engine, PoolWatch]]:
    engine = create_db_engine(server_only_db_url)
    watch = PoolWatch(engine)
    handler = _PingCounter(watch)
    logger = logging.getLogger(db_module.__name__)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield engine, watch
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        engine.dispose()


def _idle_past_threshold() -> None:
    time.sleep(PING_AFTER_IDLE_SECONDS + 0.3)


def test_a_connection_handed_back_a_moment_ago_is_not_pinged(
    watched: tuple[sa.Engine, PoolWatch],
) -> None:
    engine, watch = watched
    with engine.connect() as conn:
        first = _own_id(conn)
    for _ in range(5):
        with engine.connect() as conn:
            assert _own_id(conn) == first  # the same pooled connection ...
    assert watch.pings == 0  # ... never asked whether it lives
    assert watch.connects == 1


def test_an_idle_connection_is_pinged_once_per_checkout_after_the_threshold(
    watched: tuple[sa.Engine, PoolWatch],
) -> None:
    engine, watch = watched
    with engine.connect() as conn:
        first = _own_id(conn)
    _idle_past_threshold()
    with engine.connect() as conn:  # idle long enough: pinged, alive, kept
        assert _own_id(conn) == first
    assert watch.pings == 1
    with engine.connect() as conn:  # handed back just now: not again
        assert _own_id(conn) == first
    assert watch.pings == 1
    assert watch.connects == 1 and watch.invalidated == []


def test_an_idle_connection_killed_by_the_server_is_replaced_at_checkout(
    server_only_db_url: str, watched: tuple[sa.Engine, PoolWatch]
) -> None:
    engine, watch = watched
    with engine.connect() as conn:
        dead = _own_id(conn)
    _idle_past_threshold()
    _kill(server_only_db_url, dead)
    with engine.connect() as conn:  # no error reaches the caller
        replacement = _own_id(conn)
    assert replacement != dead
    assert watch.pings == 1
    assert watch.connects == 2
    assert len(watch.invalidated) == 1
    assert isinstance(watch.invalidated[0], DisconnectionError)  # found by the ping


def test_a_fresh_connection_killed_fails_its_statement_then_the_pool_reconnects(
    server_only_db_url: str, watched: tuple[sa.Engine, PoolWatch]
) -> None:
    """Within the threshold nothing asks: the killed connection's first statement fails as a
    disconnect (what every caller already meets as a database error), SQLAlchemy drops it and
    the pool's older connections, and the next checkout works."""
    engine, watch = watched
    a, b = engine.connect(), engine.connect()  # two pooled connections
    dead, older = _own_id(a), _own_id(b)
    a.close()  # the pool hands out the one returned first: the dead one
    b.close()
    _kill(server_only_db_url, dead)
    with engine.connect() as conn:
        with pytest.raises(DBAPIError) as failed:
            _own_id(conn)
        assert failed.value.connection_invalidated
    assert watch.pings == 0
    with engine.connect() as conn, engine.connect() as other:
        ids = {_own_id(conn), _own_id(other)}
    assert dead not in ids and older not in ids  # the older one went with it, unasked
    assert watch.connects == 4


def test_an_explicit_pool_pre_ping_is_kept(server_only_db_url: str) -> None:
    """``pool_pre_ping=True`` pings every checkout (SQLAlchemy's own), so even a connection
    killed a moment ago is replaced before use; ``False`` turns every check off."""
    engine = create_db_engine(server_only_db_url, pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            dead = _own_id(conn)
        _kill(server_only_db_url, dead)
        with engine.connect() as conn:
            assert _own_id(conn) != dead
    finally:
        engine.dispose()
    engine = create_db_engine(server_only_db_url, pool_pre_ping=False)
    try:
        with engine.connect() as conn:
            dead = _own_id(conn)
        _idle_past_threshold()
        _kill(server_only_db_url, dead)
        with engine.connect() as conn, pytest.raises(DBAPIError):
            _own_id(conn)
    finally:
        engine.dispose()


def test_sqlite_has_no_ping(tmp_sqlite_url: str) -> None:
    engine = create_db_engine(tmp_sqlite_url)
    try:
        assert not engine.pool._pre_ping
        assert not engine.pool.dispatch.checkout
        assert not engine.pool.dispatch.checkin
    finally:
        engine.dispose()


def test_a_tick_right_after_its_idle_connections_were_killed_loses_one_batch_only(
    server_only_db_url: str, tmp_path: Path
) -> None:
    """A worker whose pooled connections were all dropped a moment ago (an admin's kill, a
    restart quicker than the ping threshold): the first statement on one of them fails, its
    transaction rolls back and is counted like any database error, the pool reconnects, the
    tick goes on, and whatever that transaction would have done is done by the next tick,
    each order exactly once and nothing half-written."""
    pdir = _prepare(server_only_db_url, tmp_path)
    engine, refs, ids = _place(server_only_db_url, pdir, n=3)
    engine.batch_size = 1
    assert _kill_idle(engine.db, server_only_db_url), "placing left no pooled connection"

    first = engine.tick()  # must not raise
    assert first.errors == 1
    assert any("database error" in m and "rolled back" in m for m in first.error_messages)
    assert all(engine.order(r).states() in ({"new": 2}, {"done": 2}) for r in refs)

    second = engine.tick()
    assert second.errors == 0
    assert all(engine.order(r).states() == {"done": 2} for r in refs)
    assert sorted(r["item_id"] for r in _runs(server_only_db_url)) == sorted(ids)  # once each
    assert _history_count(server_only_db_url, ids) == len(ids)
    engine.close()



class _Booked(Call):
    """``tests.test_drive_concurrency``'s call, whose lost answers the other side confirms as
    booked (so a reconciled intent settles on its own); counts both ways in, and runs
    ``during`` (once) while the call is in flight."""

    def __init__(self) -> None:
        self.sent = 0
        self.reconciled = 0
        self.during: Callable[[], None] | None = None

    def send(self, call: PreparedCall[dict[str, str]], io: CallContext) -> str:
        self.sent += 1
        answer = super().send(call, io)
        during, self.during = self.during, None
        if during is not None:
            during()
        return answer

    def reconcile(self, summary: dict[str, Any], io: CallContext) -> Reconciled | None:
        self.reconciled += 1
        return Reconciled(True, detail="booked")

    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: str | Reconciled,
    ) -> None:
        assert answer == "ok" or (isinstance(answer, Reconciled) and answer.booked)


def _kill_idle(engine: sa.Engine, url: str) -> list[int]:
    """Drop every connection idle in ``engine``'s pool (they stay in the pool, fresh)."""
    pool = engine.pool
    idle = [engine.connect() for _ in range(pool.checkedin())]  # type: ignore[attr-defined]
    victims = [_own_id(c) for c in idle]
    for conn in idle:
        conn.close()
    for victim in victims:
        _kill(url, victim)
    return victims


def _track_ids(engine: sa.Engine) -> list[int]:
    """The server's id of every connection ``engine``'s pool opens from now on (whether it
    is idle in the pool or checked out: the tick keeps one between its transactions)."""
    ids: list[int] = []

    @event.listens_for(engine, "connect")
    def _connected(dbapi_connection: Any, _record: Any) -> None:
        query = "SELECT pg_backend_pid()" if engine.dialect.name == "postgresql" else (
            "SELECT CONNECTION_ID()"
        )
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(query)
            ids.append(int(cursor.fetchone()[0]))
        finally:
            cursor.close()
        dbapi_connection.rollback()  # no transaction left open by the look

    return ids


def _kill_all(engine: sa.Engine, url: str, ids: list[int]) -> list[int]:
    """Drop every connection of ``engine``: those idle in its pool and those of ``ids``
    still open (checked out, as the one a tick keeps between its transactions)."""
    victims = _kill_idle(engine, url)
    for victim in ids:
        if victim not in victims:
            try:
                _kill(url, victim)
            except DBAPIError:  # MariaDB: closed already (the pool let it go)
                continue
            victims.append(victim)
    return victims


def test_a_settle_on_a_connection_killed_during_the_call_leaves_the_intent_open(
    server_only_db_url: str, tmp_path: Path
) -> None:
    """The gateway call succeeds, and while it is in flight (well within the ping threshold)
    every connection of the worker is dropped: those idle in its pool and the one the tick
    keeps between its transactions (no transaction open on it). The settle meets one: the
    chain counts a database error and leaves the intent open (nothing lost, nothing
    half-written), the next tick reconciles it, and the call went out once."""
    upgrade(server_only_db_url)
    pdir = tmp_path / "processes"
    pdir.mkdir()
    (pdir / "Drive01.yaml").write_text(DRIVE_PROCESS, encoding="utf-8")
    command = _Booked()
    registry = PluginRegistry()
    registry.register_external("Drive/Call", command)
    engine = Engine(server_only_db_url, process_dir=pdir, registry=registry,
                    services={"gateway": Gateway()}, concurrency=1, lease_seconds=2)
    ref = f"D-{uuid.uuid4().hex[:8]}"
    engine.place_order(order_doc(ref, process="Drive01", lines=(("SKU-A", 1),)), fire=False)
    killed: list[int] = []
    engine.db.dispose()  # every connection from here on is tracked
    ids = _track_ids(engine.db)
    command.during = lambda: killed.extend(_kill_all(engine.db, server_only_db_url, ids))

    first = engine.tick()
    assert killed, "the worker had no idle connection to kill"
    assert command.sent == 1
    assert first.errors == 1
    assert any("database error" in m for m in first.error_messages), first.error_messages
    assert engine.order(ref).states() == {"new": 1}  # the settle rolled back whole
    assert [i.order_ref for i in engine.intents(ref)] == [ref]  # open, to be reconciled
    assert engine.order(ref).claimed_by is None  # the lease went with the failure

    # An open intent is reconciled once its lease time has passed (2 s here).
    deadline = time.monotonic() + 30
    while engine.order(ref).states() != {"done": 1}:
        assert time.monotonic() < deadline, "the order never finished"
        result = engine.tick()
        assert result.errors == 0, result.error_messages
        time.sleep(0.2)
    assert command.reconciled == 1  # the first call's booking, confirmed
    assert command.sent == 2  # ... and the second call (first -> second) went out once
    assert not engine.intents(ref)
    engine.close()
