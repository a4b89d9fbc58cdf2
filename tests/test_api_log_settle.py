"""The API-log rows of the engine's gateway calls go with the transaction that settles them,
and a settle that rolls back still leaves every row.

Real engine, real sandbox over HTTP, real databases: SQLAlchemy's own events on the engine's
``Engine`` say on which transaction each ``INSERT INTO ratepay_api_log`` ran. Before the rows
were held for the settle, every call wrote its row at once in a transaction of its own (three
per invoice order); now an order's calls make two INSERTs (one per settle), each in the
transaction that also runs the settle's compare-and-set on ``oms_intent`` and commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event, text

from ratepay_oms.demo import demo_engine, example_order
from ratepay_oms.engine.plugins import ExternalCommand
from ratepay_oms.persistence.api_log import ApiLogEntry
from ratepay_oms.persistence.held import HeldRows, Rider, held_for, holding
from ratepay_oms.ratepay.api_log import ApiCallRecord, CallCollector, SqlApiLogSink, to_row

LOG = ApiLogEntry.__table__
PAYMENT_REQUEST = "Ratepay/PaymentRequest"


@dataclass
class Txn:
    """One transaction of one connection as the events saw it."""

    statements: list[str] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)
    """The first parameter set of each statement, by bound parameter name (every dialect)."""
    end: str | None = None  # "commit" / "rollback"

    def logs(self) -> int:
        """Statements that insert API-log rows (alone, or carried by the settle's)."""
        return sum(_logs(s) for s in self.statements)

    def carried(self) -> int:
        """Of those, the ones the settle's compare-and-set carried (PostgreSQL)."""
        return sum(_logs(s) and _settles(s) for s in self.statements)

    def settled_intent(self) -> int:
        (intent_id,) = [p["intent_id"] for s, p in zip(self.statements, self.params, strict=True)
                        if _settles(s)]
        return int(intent_id)

    def logged_orders(self) -> set[str]:
        """The order references of the API-log rows this transaction inserted."""
        return {
            v for s, p in zip(self.statements, self.params, strict=True)
            if _logs(s)
            for k, v in p.items() if k.startswith("order_ref")
        }

    def settles(self) -> bool:
        """Whether the settle's compare-and-set on the intent's status ran in it."""
        return any(_settles(s) for s in self.statements)


def _logs(statement: str) -> bool:
    return statement.startswith((
        "INSERT INTO ratepay_api_log", "WITH held_rows AS (INSERT INTO ratepay_api_log"
    ))


def _settles(statement: str) -> bool:
    return "UPDATE oms_intent SET status" in statement


class Watch:
    """Every statement on the engine, grouped by the transaction it ran in (``None``: none),
    and the pool's checkouts."""

    def __init__(self, db: sa.Engine) -> None:
        self.db = db
        self.txns: list[Txn] = []
        self.outside: list[str] = []
        self.checkouts = 0
        self._open: dict[int, Txn] = {}
        self.collected_at_insert: list[int] = []
        self.collector: CallCollector | None = None
        self.ref = ""

    def __enter__(self) -> Watch:
        event.listen(self.db, "begin", self._begin)
        event.listen(self.db, "commit", self._commit)
        event.listen(self.db, "rollback", self._rollback)
        event.listen(self.db, "before_cursor_execute", self._execute)
        event.listen(self.db.pool, "checkout", self._checkout)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.db, "begin", self._begin)
        event.remove(self.db, "commit", self._commit)
        event.remove(self.db, "rollback", self._rollback)
        event.remove(self.db, "before_cursor_execute", self._execute)
        event.remove(self.db.pool, "checkout", self._checkout)

    def _begin(self, conn: Any) -> None:
        txn = Txn()
        self._open[id(conn)] = txn
        self.txns.append(txn)

    def _close(self, conn: Any, how: str) -> None:
        txn = self._open.pop(id(conn), None)
        if txn is not None:
            txn.end = how

    def _commit(self, conn: Any) -> None:
        self._close(conn, "commit")

    def _rollback(self, conn: Any) -> None:
        self._close(conn, "rollback")

    def _execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statement = " ".join(statement.split())
        if _logs(statement) and self.collector is not None:
            self.collected_at_insert.append(len(self.collector.records))
        txn = self._open.get(id(conn))
        if txn is None:
            self.outside.append(statement)
            return
        txn.statements.append(statement)
        parameters, context = args[0], args[1]
        compiled = getattr(context, "compiled_parameters", None)
        if compiled:  # Connection.execute
            txn.params.append(dict(compiled[0]))
        elif isinstance(parameters, dict):  # a prebuilt statement's text, sent as it is
            txn.params.append(dict(parameters))
        else:
            txn.params.append({})

    def _checkout(self, *args: Any) -> None:
        self.checkouts += 1

    def log_txns(self) -> list[Txn]:
        return [t for t in self.txns if t.logs()]


def _collect(engine: Any) -> CallCollector:
    """The facade's sink behind a collector (as the console wraps it): what each call gave to
    the log, to compare with the rows."""
    facade = engine.services["ratepay"]
    collector = CallCollector(facade.api_log)
    facade.api_log = collector
    return collector


def _rows(engine: Any, ref: str) -> list[dict[str, Any]]:
    with engine.db.connect() as conn:
        rows = conn.execute(
            sa.select(LOG).where(LOG.c.order_ref == ref).order_by(LOG.c.id)
        ).mappings().all()
    return [dict(r) for r in rows]


def _same_rows(stored: list[dict[str, Any]], records: list[ApiCallRecord]) -> None:
    """The rows say exactly what the facade gave the log (``created_at`` to the second: MariaDB
    keeps no fractions), in the order of the calls."""
    assert len(stored) == len(records)
    for row, record in zip(stored, records, strict=True):
        expected = to_row(record)
        got = {k: v for k, v in row.items() if k != "id"}
        assert abs(got.pop("created_at") - expected.pop("created_at")) < timedelta(seconds=1)
        assert got == expected


def _placed_with_every_row(engine: Any, prefix: str) -> Watch:
    """Place an invoice order under a :class:`Watch` (returned, ``ref`` set): it comes to rest
    with no intent open and one API-log row per call, saying what the facade logged."""
    collector = _collect(engine)
    ref = f"{prefix}-{uuid.uuid4().hex[:8]}"
    with Watch(engine.db) as watch:
        view = engine.place_order(example_order(ref))
    watch.ref = ref
    assert view.states() == {"ready for shipment": 4}
    assert not engine.intents(ref)
    records = collector.take()
    assert [r.operation for r in records] == [
        "PAYMENT_INIT", "PAYMENT_REQUEST", "PAYMENT_CONFIRM"
    ]
    _same_rows(_rows(engine, ref), records)
    return watch


@pytest.fixture
def shared(sandbox: Any, server_db_url: str) -> Iterator[Any]:
    engine = demo_engine(server_db_url, sandbox.settings)
    yield engine
    engine.close()


def test_an_orders_rows_are_written_by_its_settles_one_insert_each(shared: Any) -> None:
    engine = shared
    collector = _collect(engine)
    ref = f"LOGSET-{uuid.uuid4().hex[:8]}"
    with Watch(engine.db) as watch:
        watch.collector = collector
        view = engine.place_order(example_order(ref))
    assert view.states() == {"ready for shipment": 4}

    records = collector.take()
    assert [r.operation for r in records] == ["PAYMENT_INIT", "PAYMENT_REQUEST", "PAYMENT_CONFIRM"]
    _same_rows(_rows(engine, ref), records)

    # Two INSERTs (INIT + REQUEST with the first settle, CONFIRM with the second), each in a
    # settling transaction that committed; none anywhere else.
    assert not any(_logs(s) for s in watch.outside)
    written = watch.log_txns()
    assert [t.logs() for t in written] == [1, 1]
    assert all(t.settles() and t.end == "commit" for t in written)
    # On PostgreSQL each rides on its settle's compare-and-set: no statement of its own.
    carried = 1 if engine.db.dialect.name == "postgresql" else 0
    assert [t.carried() for t in written] == [carried, carried]
    # The console's collector saw each call when it was made, before its row was written.
    assert watch.collected_at_insert == [2, 3]
    # The drive's three transactions (plan, two settles), one remember (INIT's transaction id
    # before PAYMENT_REQUEST leaves) and the view place_order returns: no connection of
    # its own for a log row (there were three more).
    assert watch.checkouts <= 5, watch.checkouts


def test_a_ticks_concurrent_calls_each_write_their_own_rows_with_their_settle(
    sandbox: Any, fresh_db_url: str
) -> None:
    """Four chains on the call pool's threads at once (every answer 0.2 s late, so their calls
    overlap): each call's rows go with the settle of its own intent, none with another's."""
    from ratepay_oms.sandbox.faults import Fault

    engine = demo_engine(fresh_db_url, sandbox.settings)
    try:
        refs = [f"LOGTICK-{n}-{uuid.uuid4().hex[:6]}" for n in range(6)]
        for ref in refs:
            engine.place_order(example_order(ref), fire=False)
        collector = _collect(engine)
        sandbox.gateway.faults.add(Fault("delay", delay_s=0.2))
        with Watch(engine.db) as watch:
            result = engine.tick(concurrency=4)
        assert not result.errors
        records = collector.take()
        intent_of: dict[int, str] = {}
        for ref in refs:
            assert engine.order(ref).states() == {"ready for shipment": 4}
            _same_rows(_rows(engine, ref), [r for r in records if r.order_ref == ref])
            intent_of.update((i.id, ref) for i in engine.intents(ref, open_only=False))
        assert len(records) == 3 * len(refs)

        written = watch.log_txns()
        assert len(written) == 2 * len(refs)
        for txn in written:
            assert txn.settles() and txn.end == "commit" and txn.logs() == 1
            assert txn.logged_orders() == {intent_of[txn.settled_intent()]}
    finally:
        engine.close()


class FailingSettle(ExternalCommand[Any, Any]):
    """The real payment request, whose settle fails after it applied the answer: by raising
    (``raise``) or by a statement the database refuses (``database``)."""

    def __init__(self, real: ExternalCommand[Any, Any], how: str) -> None:
        self.real = real
        self.how = how

    def plan(self, ctx: Any, order: Any, items: Any) -> Any:
        return self.real.plan(ctx, order, items)

    def send(self, call: Any, io: Any) -> Any:
        return self.real.send(call, io)

    def apply(self, ctx: Any, order: Any, items: Any, summary: Any, answer: Any) -> None:
        self.real.apply(ctx, order, items, summary, answer)
        if self.how == "database":
            ctx.session.execute(text("SELECT no_such_column FROM ratepay_api_log"))
        raise RuntimeError("the settle fails here")

    def reconcile(self, summary: Any, io: Any) -> Any:
        return self.real.reconcile(summary, io)


@pytest.mark.parametrize("how", ["raise", "database"])
def test_a_settle_that_rolls_back_still_leaves_the_rows(
    sandbox: Any, fresh_db_url: str, how: str
) -> None:
    engine = demo_engine(fresh_db_url, sandbox.settings)
    try:
        engine.registry.register_external(
            PAYMENT_REQUEST, FailingSettle(engine.registry.external(PAYMENT_REQUEST), how)
        )
        collector = _collect(engine)
        ref = f"LOGFAIL-{uuid.uuid4().hex[:8]}"
        with Watch(engine.db) as watch:
            if how == "raise":
                with pytest.raises(RuntimeError, match="the settle fails here"):
                    engine.place_order(example_order(ref))
            else:
                engine.place_order(example_order(ref))
        # Nothing of the settle stayed: the intent is open, the items wait on it.
        assert engine.order(ref).states() == {"payment request initialized": 4}
        (intent,) = engine.intents(ref)
        assert intent.status == "pending"

        records = collector.take()
        assert [r.operation for r in records] == ["PAYMENT_INIT", "PAYMENT_REQUEST"]
        _same_rows(_rows(engine, ref), records)
        # The settle took the rows and rolled back; then each was written by itself
        # (PostgreSQL: an autocommit statement, which the events see as a transaction
        # "rolled back" after the fact).
        (settle,) = [t for t in watch.txns if t.settles()]
        assert settle.end == "rollback" and settle.logs() == 1
        apart = [t for t in watch.log_txns() if not t.settles()]
        assert [t.logs() for t in apart] == [1, 1]
    finally:
        engine.close()


class RefusedWriter:
    """Held rows the database refuses (their table does not exist)."""

    def __init__(self) -> None:
        self.apart: list[dict[str, Any]] = []

    def write_rows(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        conn.execute(text("INSERT INTO no_such_table (x) VALUES (1)"))

    def write_each(self, rows: list[dict[str, Any]]) -> None:
        self.apart.extend(rows)


class RefusedRowsToo(FailingSettle):
    """The real payment request; its call also holds a row the database will refuse."""

    def __init__(self, real: ExternalCommand[Any, Any], db: sa.Engine) -> None:
        super().__init__(real, "")
        self.db = db
        self.refused = RefusedWriter()

    def send(self, call: Any, io: Any) -> Any:
        answer = self.real.send(call, io)
        held = held_for(self.db)
        assert held is not None
        held.add(self.refused, {"x": 1})
        return answer

    def apply(self, ctx: Any, order: Any, items: Any, summary: Any, answer: Any) -> None:
        self.real.apply(ctx, order, items, summary, answer)


def test_held_rows_the_database_refuses_do_not_cost_the_settle(
    sandbox: Any, fresh_db_url: str
) -> None:
    """The held INSERT fails (on PostgreSQL that aborts the transaction): the settle runs in a
    fresh transaction and commits, and the rows are written apart."""
    engine = demo_engine(fresh_db_url, sandbox.settings)
    try:
        command = RefusedRowsToo(engine.registry.external(PAYMENT_REQUEST), engine.db)
        engine.registry.register_external(PAYMENT_REQUEST, command)
        watch = _placed_with_every_row(engine, "LOGREF")
        assert command.refused.apart == [{"x": 1}]
        # First settle: rows refused, that transaction rolled back before any work, settled in
        # a new one without them, committed; then INIT's and REQUEST's rows written apart.
        # Second settle (CONFIRM): as usual.
        first, second = [t for t in watch.txns if t.settles()]
        assert first.end == "commit" and first.logs() == 0
        assert second.end == "commit" and second.logs() == 1
        tried, *apart = [t for t in watch.log_txns() if not t.settles()]
        assert tried.end == "rollback" and tried.statements[-1].startswith("INSERT INTO no_such")
        assert [t.logs() for t in apart] == [1, 1]
    finally:
        engine.close()


def test_rows_for_another_database_are_written_at_once(tmp_path: Any) -> None:
    """A sink on another engine than the held call's never holds its row (the settle could
    not write it on its connection)."""
    from ratepay_oms.persistence.base import Base
    from ratepay_oms.persistence.db import session_factory

    drive_db = sa.create_engine(f"sqlite:///{tmp_path / 'drive.sqlite'}")
    log_db = sa.create_engine(f"sqlite:///{tmp_path / 'log.sqlite'}")
    try:
        Base.metadata.create_all(log_db, tables=[LOG])
        sink = SqlApiLogSink(session_factory(log_db))
        held = HeldRows(drive_db)
        record = ApiCallRecord(
            created_at=datetime.now(UTC),
            operation="PAYMENT_INIT", subtype=None, transaction_id=None, order_ref="X-1",
            success=True, status_code="OK", reason_code=None, reason_text=None,
            result_code=350, result_text="ok", http_status=200, error=None, duration_ms=3,
            request_xml="<a/>", response_xml="<b/>",
        )
        with holding(held):
            sink.record(record)
        assert not held
        with log_db.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(LOG)) == 1

        # The same engine: held until written.
        same = HeldRows(log_db)
        with holding(same):
            sink.record(record)
        assert same
        with log_db.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(LOG)) == 1
        same.write_apart()
        with log_db.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(LOG)) == 2
    finally:
        drive_db.dispose()
        log_db.dispose()


class RefusedRider(SqlApiLogSink):
    """The real sink, whose rows the database refuses when a settle carries them (their
    INSERT names a table that does not exist); written apart, they go in as usual."""

    def __init__(self, real: SqlApiLogSink) -> None:
        super().__init__(real.session_factory)
        self.riders = 0

    def rider(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> Rider | None:
        self.riders += 1
        return Rider(
            text("INSERT INTO no_such_table (x) VALUES (:x_0)").bindparams(
                sa.bindparam("x_0", type_=sa.Integer)
            ),
            {"x_0": 1},
        )


def test_held_rows_refused_while_riding_on_the_settle_do_not_cost_it(
    sandbox: Any, fresh_db_url: str
) -> None:
    """PostgreSQL: the rows ride on the settle's compare-and-set; refused there, the whole
    settle rolls back and runs again without them (committing once), and they are written
    apart. Other databases never ask for a rider: the rows go first, on their own."""
    engine = demo_engine(fresh_db_url, sandbox.settings)
    try:
        facade = engine.services["ratepay"]
        sink = RefusedRider(facade.api_log)
        facade.api_log = sink
        watch = _placed_with_every_row(engine, "LOGRIDE")
        ref = watch.ref
        settles = [t for t in watch.txns if t.settles()]
        if engine.db.dialect.name != "postgresql":
            assert sink.riders == 0
            assert [(t.end, t.logs()) for t in settles] == [("commit", 1), ("commit", 1)]
            return
        assert sink.riders == 2
        # Each settle: tried carrying the refused INSERT, rolled back, settled again without
        # it and committed; its rows then written apart (INIT and REQUEST, then CONFIRM).
        assert [t.end for t in settles] == ["rollback", "commit", "rollback", "commit"]
        assert all("no_such_table" in t.statements[0] for t in settles[0::2])
        assert [t.logs() for t in settles[1::2]] == [0, 0]
        assert [t.logs() for t in watch.log_txns()] == [1, 1, 1]
        # One booking each: the rolled-back attempt left nothing behind.
        with engine.db.connect() as conn:
            outcomes = conn.execute(
                text("SELECT action, count(*) FROM ratepay_item_outcome o "
                     "JOIN oms_order d ON d.id = o.order_id WHERE d.order_ref = :ref "
                     "GROUP BY action ORDER BY action"), {"ref": ref}
            ).all()
        assert [tuple(r) for r in outcomes] == [("payment_confirm", 4), ("payment_request", 4)]
    finally:
        engine.close()
