"""The prebuilt statements of the hot path as they reach the database: ids as one text
parameter on PostgreSQL, a move's constants written into its text (a plain move's and a
forced one's rows), and ``execute_rowless`` sending the compiled text where it may, on every
dialect."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime

import pytest
from sqlalchemy import select, update

from ratepay_oms.demo import example_order
from ratepay_oms.engine.engine import Engine
from ratepay_oms.engine.persist import (
    Forced,
    MoveKey,
    Origin,
    StateWriter,
    id_in,
    ids_clause,
    ids_style,
    ids_value,
    prebuilt,
)
from ratepay_oms.persistence.models import OrderItem, StateHistory, TransitionLog
from ratepay_oms.persistence.statements import _DRIVER_SQL, execute_rowless
from ratepay_oms.process.loader import default_process_dir

NOW = datetime(2026, 3, 2, 12, 0, 0)


@pytest.fixture
def engine(fresh_db_url: str) -> Iterator[Engine]:
    """A database of its own: the orders here wait in ``new`` or sit in states no process
    has, which a tick or a process migration of another test on a shared database would
    take up."""
    eng = Engine(fresh_db_url, process_dir=default_process_dir())
    eng.upgrade_db()
    yield eng
    eng.close()


def _items(engine: Engine) -> list[OrderItem]:
    view = engine.place_order(example_order(f"PST-{uuid.uuid4().hex[:8]}"), fire=False)
    with engine.session() as s:
        items = list(s.scalars(
            select(OrderItem).where(OrderItem.order.has(order_ref=view.order_ref))
            .order_by(OrderItem.id)
        ))
        s.expunge_all()
    return items


def test_ids_value_on_postgresql_is_the_array_s_text() -> None:
    assert ids_value([3, 1, 2], "array") == "{3,1,2}"
    assert ids_value([], "array") == "{}"


def test_ids_pick_exactly_their_rows(engine: Engine) -> None:
    items = _items(engine)
    wanted = [items[-1].id, items[0].id]
    with engine.session() as s:
        style = ids_style(s)
        by_clause = prebuilt(
            "test ids", style, lambda st: select(OrderItem.id).where(ids_clause(OrderItem.id, st))
        )
        assert sorted(s.scalars(by_clause, {"ids": ids_value(wanted, style)})) == sorted(wanted)
        assert list(s.scalars(by_clause, {"ids": ids_value([], style)})) == [] or style == "in"
        by_id_in = select(OrderItem.id).where(id_in(OrderItem.id, wanted, s))
        assert sorted(s.scalars(by_id_in)) == sorted(wanted)


def _rows(engine: Engine, item_id: int) -> tuple[tuple, tuple, tuple]:  # type: ignore[type-arg]
    with engine.session() as s:
        history = s.execute(
            select(StateHistory.from_state, StateHistory.to_state, StateHistory.event,
                   StateHistory.created_at, StateHistory.forced, StateHistory.actor,
                   StateHistory.reason, StateHistory.data)
            .where(StateHistory.item_id == item_id).order_by(StateHistory.id.desc()).limit(1)
        ).one()
        log = s.execute(
            select(TransitionLog.process, TransitionLog.event, TransitionLog.source_state,
                   TransitionLog.target_state, TransitionLog.command, TransitionLog.condition,
                   TransitionLog.is_error, TransitionLog.error_message, TransitionLog.hostname,
                   TransitionLog.argv, TransitionLog.forced, TransitionLog.actor,
                   TransitionLog.reason)
            .where(TransitionLog.item_id == item_id).order_by(TransitionLog.id.desc()).limit(1)
        ).one()
        item = s.execute(
            select(OrderItem.state, OrderItem.state_entered_at, OrderItem.retry_event,
                   OrderItem.retry_at, OrderItem.attempts, OrderItem.last_error,
                   OrderItem.intent_id)
            .where(OrderItem.id == item_id)
        ).one()
    return tuple(history), tuple(log), tuple(item)


def test_plain_and_forced_moves_write_their_values(engine: Engine) -> None:
    items = _items(engine)
    first, second = items[0], items[1]
    process, source = first.process, first.state
    with engine.session() as s, s.begin():  # a retry pending on both: the moves clear it
        s.execute(update(OrderItem).where(OrderItem.id.in_([first.id, second.id])).values(
            retry_event="ev", retry_at=NOW, attempts=3, last_error="boom"))
    origin = Origin(hostname="host-1", argv="ratepay-oms tick")
    with engine.session() as s, s.begin():
        writer = StateWriter(s, NOW, origin)
        writer.write_grouped_moves(
            {MoveKey(process, source, "elsewhere", "go", "cmd", "cond"): [first.id]},
            engine.definitions(),
        )
        writer.write_grouped_moves(
            {MoveKey(process, source, "forced here", None,
                     forced=Forced(actor="ops", reason="stuck")): [second.id]},
            engine.definitions(), data={"note": "x"},
        )
    history, log, item = _rows(engine, first.id)
    assert history == (source, "elsewhere", "go", NOW, False, None, None, None)
    assert log == (process, "go", source, "elsewhere", "cmd", "cond", False, None, "host-1",
                   "ratepay-oms tick", False, None, None)
    assert item == ("elsewhere", NOW, None, None, 0, None, None)
    history, log, item = _rows(engine, second.id)
    assert history == (source, "forced here", None, NOW, True, "ops", "stuck", '{"note": "x"}')
    assert log == (process, None, source, "forced here", None, None, False, None, "host-1",
                   "ratepay-oms tick", True, "ops", "stuck")
    assert item == ("forced here", NOW, None, None, 0, None, None)


def test_execute_rowless_sends_the_compiled_text_where_the_driver_names_parameters(
    engine: Engine,
) -> None:
    item = _items(engine)[0]
    rename = update(OrderItem.__table__).where(OrderItem.__table__.c.id == _bind("item")).values(
        name=_bind("name"))
    returning = rename.returning(OrderItem.__table__.c.name)
    with engine.session() as s, s.begin():
        conn = s.connection()
        written = execute_rowless(conn, rename, {"item": item.id, "name": "renamed"})
        assert written.rowcount == 1
        assert execute_rowless(conn, rename, {"item": -1, "name": "nobody"}).rowcount == 0
        texts = _DRIVER_SQL[conn.dialect]
        named = not conn.dialect.positional  # psycopg and PyMySQL: yes; sqlite3: no
        assert (texts[rename] is not None) == named
        if conn.dialect.update_returning:
            # RETURNING rows: left to Connection.execute, and still answered.
            assert execute_rowless(
                conn, returning, {"item": item.id, "name": "again"}
            ).scalar() == "again"
            assert texts[returning] is None
        else:
            execute_rowless(conn, rename, {"item": item.id, "name": "again"})
    with engine.session() as s:
        assert s.scalar(select(OrderItem.name).where(OrderItem.id == item.id)) == "again"


def _bind(name: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import bindparam

    return bindparam(name, type_=OrderItem.__table__.c[name if name == "name" else "id"].type)
