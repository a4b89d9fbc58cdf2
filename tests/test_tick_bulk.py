"""A bulk tick: plain moves written set-based from their orders, orders with other due work
through the runner in the same batches, windows walked as order-id ranges; every write there.

Small batches (``batch_size=2``: windows of 200 due rows, plain batches of 40 items) make 300
items take the paths a bulk tick of 400,000 takes: range windows, many batches, orders whose
due work is all plain next to orders that also have an item for the runner.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import event, func, select, update

from ratepay_oms import Engine
from ratepay_oms.engine.tick import WINDOW_BATCHES
from ratepay_oms.persistence.db import upgrade
from ratepay_oms.persistence.models import (
    EventTimeout,
    Order,
    OrderItem,
    StateHistory,
    TransitionLog,
)
from ratepay_oms.process.model import EventDef, ProcessDefinition, StateDef, TransitionDef
from tests.plugins_for_tests import make_registry, order_doc

T0 = datetime(2025, 3, 1, 12, 0, 0)
ORDERS = 60
LINES = (("SKU-A", 3), ("SKU-B", 2))  # five items per order
MIXED = 10
"""Orders whose SKU-B items wait in ``check``: an event-less move with a condition (the
runner's), next to plain moves of the same order and step."""

DEFINITION = ProcessDefinition(
    name="TickBulk01",
    initial="new",
    states={n: StateDef(n) for n in ("new", "check", "done", "later")},
    events={"expire": EventDef("expire", timeout=timedelta(days=1))},
    transitions=(
        TransitionDef("new", "done"),
        TransitionDef("check", "done", condition="Test/IsCleared"),
        TransitionDef("done", "later", event="expire"),
    ),
)


def _bulk_engine(url: str) -> Engine:
    upgrade(url)
    eng = Engine(
        url,
        definitions={DEFINITION.name: DEFINITION},
        registry=make_registry(),
        worker_id="bulk-worker",
        batch_size=2,
    )
    eng.services["cleared"] = {"SKU-B"}
    return eng


@pytest.fixture
def engine(fresh_db_url: str) -> Iterator[Engine]:
    eng = _bulk_engine(fresh_db_url)
    yield eng
    eng.close()


@pytest.fixture
def sqlite_engine(tmp_sqlite_url: str) -> Iterator[Engine]:
    """For SQLite's own path (the servers lock order by order, so they have nothing to run)."""
    eng = _bulk_engine(tmp_sqlite_url)
    yield eng
    eng.close()


def test_bulk_tick_moves_everything_once_with_every_write(engine: Engine) -> None:
    refs = [f"B-{uuid.uuid4().hex[:10]}" for _ in range(ORDERS)]
    for r in refs:
        engine.place_order(order_doc(r, process=DEFINITION.name, lines=LINES), now=T0, fire=False)
    items = ORDERS * 5
    assert items > 2 * WINDOW_BATCHES  # more due rows than one window: range windows
    with engine.session() as s, s.begin():
        mixed = list(s.scalars(select(Order.id).where(Order.order_ref.in_(refs[:MIXED]))))
        s.execute(
            update(OrderItem)
            .where(OrderItem.order_id.in_(mixed), OrderItem.sku == "SKU-B")
            .values(state="check")
        )

    result = engine.tick(now=T0)

    assert (result.items_moved, result.orders_seen, result.errors) == (items, ORDERS, 0)
    with engine.session() as s:
        assert dict(
            s.execute(select(OrderItem.state, func.count()).group_by(OrderItem.state)).all()
        ) == {"done": items}
        history = Counter(
            s.execute(
                select(StateHistory.from_state).where(StateHistory.to_state == "done")
            ).scalars()
        )
        assert history == {"new": items - 2 * MIXED, "check": 2 * MIXED}
        per_item = Counter(
            s.execute(
                select(StateHistory.item_id).where(StateHistory.to_state == "done")
            ).scalars()
        )
        assert len(per_item) == items and set(per_item.values()) == {1}
        logged = Counter(
            s.execute(
                select(TransitionLog.item_id).where(TransitionLog.target_state == "done")
            ).scalars()
        )
        assert len(logged) == items and set(logged.values()) == {1}
        timeouts = s.execute(select(EventTimeout.state, EventTimeout.event)).all()
        assert Counter(timeouts) == {("done", "expire"): items}

    assert engine.tick(now=T0).items_moved == 0  # nothing moves twice
    later = engine.tick(now=T0 + timedelta(days=2))  # the timeouts the batches armed fire
    assert (later.items_moved, later.timeouts_fired) == (items, items)
    with engine.session() as s:
        assert s.scalar(select(func.count()).select_from(EventTimeout)) == 0
        assert s.scalar(
            select(func.count()).where(OrderItem.state == "later")
        ) == items


def test_a_leased_order_is_left_alone_by_the_set_based_moves(engine: Engine) -> None:
    refs = [f"L-{uuid.uuid4().hex[:10]}" for _ in range(3)]
    for r in refs:
        engine.place_order(order_doc(r, process=DEFINITION.name, lines=LINES), now=T0, fire=False)
    with engine.session() as s, s.begin():
        s.execute(
            update(Order)
            .where(Order.order_ref == refs[1])
            .values(claimed_by="other-worker", claim_expires_at=datetime(2999, 1, 1))
        )

    result = engine.tick(now=T0)

    assert result.items_moved == 10
    assert engine.order(refs[1]).states() == {"new": 5}
    assert engine.order(refs[0]).states() == engine.order(refs[2]).states() == {"done": 5}


CHAIN = ProcessDefinition(
    name="TickChain01",
    initial="new",
    states={n: StateDef(n) for n in ("new", "waiting", "next", "end")},
    events={"expire": EventDef("expire", timeout=timedelta(days=1))},
    transitions=(
        TransitionDef("new", "waiting"),
        TransitionDef("waiting", "next", event="expire"),
        TransitionDef("next", "end"),
    ),
)


def test_an_idle_tick_is_one_probe_and_a_busy_one_still_runs_every_later_step(
    fresh_db_url: str,
) -> None:
    """The probe skips steps with nothing due only up to the first step with work: the
    timeouts step moves items into ``next``, where the event-less step (empty when the tick
    began) moves them on in the same tick, as before. An idle tick asks one statement."""
    upgrade(fresh_db_url)
    eng = Engine(fresh_db_url, definitions={CHAIN.name: CHAIN}, registry=make_registry())
    try:
        ref = f"C-{uuid.uuid4().hex[:10]}"
        eng.place_order(order_doc(ref, process=CHAIN.name, lines=LINES), now=T0)
        assert eng.tick(now=T0).items_moved == 5
        assert {i.state for i in eng.order(ref).items} == {"waiting"}

        statements: list[str] = []

        def seen(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
            statements.append(statement)

        event.listen(eng.db, "before_cursor_execute", seen)
        try:
            idle = eng.tick(now=T0 + timedelta(hours=1))
            asked = [s for s in statements if not s.upper().startswith(("BEGIN", "COMMIT"))]
            busy = eng.tick(now=T0 + timedelta(days=2))
        finally:
            event.remove(eng.db, "before_cursor_execute", seen)

        assert (idle.items_moved, idle.errors) == (0, 0)
        assert len(asked) == 1 and "EXISTS" in asked[0].upper(), asked
        assert (busy.timeouts_fired, busy.items_moved) == (5, 10)
        assert {i.state for i in eng.order(ref).items} == {"end"}
    finally:
        eng.close()


def test_sqlite_moves_a_dense_span_range_by_range_skipping_leased_and_runner_orders(
    sqlite_engine: Engine,
) -> None:
    """SQLite moves the plain moves of a dense due span by order-id ranges (no per-order
    window): every write is there, an order leased by another worker is left alone, an
    expired lease is taken over, and an order with an item for the runner goes through the
    window walk after the ranges, as a whole."""
    engine = sqlite_engine
    refs = [f"R-{uuid.uuid4().hex[:10]}" for _ in range(ORDERS)]
    for r in refs:
        engine.place_order(order_doc(r, process=DEFINITION.name, lines=LINES), now=T0, fire=False)
    items = ORDERS * 5
    with engine.session() as s, s.begin():
        s.execute(
            update(Order)
            .where(Order.order_ref == refs[7])
            .values(claimed_by="other-worker", claim_expires_at=datetime(2999, 1, 1))
        )
        s.execute(
            update(Order)
            .where(Order.order_ref == refs[8])
            .values(claimed_by="dead-worker", claim_expires_at=datetime(2000, 1, 1))
        )
        mixed = s.scalar(select(Order.id).where(Order.order_ref == refs[20]))
        s.execute(
            update(OrderItem)
            .where(OrderItem.order_id == mixed, OrderItem.sku == "SKU-B")
            .values(state="check")
        )
    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(engine.db, "before_cursor_execute", seen)
    try:
        result = engine.tick(now=T0)
    finally:
        event.remove(engine.db, "before_cursor_execute", seen)

    ranged = [
        s for s in statements
        if s.startswith("UPDATE oms_order_item") and "oms_order_item.order_id >" in s
    ]
    assert len(ranged) > 2, "the plain moves did not go range by range"
    assert (result.items_moved, result.orders_seen, result.errors) == (
        items - 5, ORDERS - 1, 0,
    )
    assert engine.order(refs[7]).states() == {"new": 5}
    assert engine.order(refs[8]).states() == {"done": 5}
    assert engine.order(refs[20]).states() == {"done": 5}
    with engine.session() as s:
        assert s.scalar(select(Order.claimed_by).where(Order.order_ref == refs[8])) is None
        for table, column in (
            (StateHistory, StateHistory.to_state),
            (TransitionLog, TransitionLog.target_state),
        ):
            per_item = Counter(
                s.execute(select(table.item_id).where(column == "done")).scalars()
            )
            assert len(per_item) == items - 5 and set(per_item.values()) == {1}
        assert s.scalar(select(func.count()).select_from(EventTimeout)) == items - 5
    assert engine.tick(now=T0).items_moved == 0  # nothing moves twice
