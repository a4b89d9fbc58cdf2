"""Unit checks of the runner's bookkeeping that the flows only cover in part."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import cast

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session

from ratepay_oms.engine.runner import MAX_EVENT_REPEATS, Loaded, LoopGuard, Runner, RunStats
from ratepay_oms.persistence.base import Base
from ratepay_oms.persistence.models import Order, OrderItem


def _filled(seed: int) -> RunStats:
    """A RunStats with a distinct value in every field (a new field is filled too)."""
    stats = RunStats()
    for n, f in enumerate(fields(RunStats)):
        value = getattr(stats, f.name)
        if isinstance(value, list):
            value.extend([(seed, f.name, n), (seed + 1, f.name, n)])
        else:
            setattr(stats, f.name, seed * 100 + n + 1)
    return stats


def test_run_stats_add_sums_every_field() -> None:
    """``RunStats.add`` names its fields one by one: a field added to the class but not to
    ``add`` would be dropped from every drive's figures."""
    total, first, second = _filled(1), _filled(1), _filled(5)
    total.add(second)
    for f in fields(RunStats):
        mine, theirs, got = getattr(first, f.name), getattr(second, f.name), getattr(total, f.name)
        if isinstance(mine, list):
            assert got == mine + theirs, f.name
        else:
            assert got == mine + theirs, f.name


def test_run_stats_add_keeps_its_own_lists() -> None:
    total, other = RunStats(), _filled(3)
    moves = total.moves
    total.add(other)
    total.add(RunStats())
    assert total.moves is moves and total.moves == other.moves
    assert other.moves is not total.moves


def test_loop_guard_counts_restores_and_stops() -> None:
    guard = LoopGuard()
    assert guard.allow(1, "new", "pay")
    start = guard.checkpoint()
    for _ in range(MAX_EVENT_REPEATS - 1):
        assert guard.allow(1, "new", "pay")
    assert guard.fired(1, "new", "pay") == MAX_EVENT_REPEATS
    assert not guard.allow(1, "new", "pay")
    assert guard.allow(2, "new", "pay")
    guard.restore(start)
    assert guard.fired(1, "new", "pay") == 1
    assert guard.fired(2, "new", "pay") == 0
    assert guard.allow(1, "new", "pay")
    assert start == {(1, "new", "pay"): 1}  # a restore leaves the checkpoint as it was


def _detached_order(units: int) -> tuple[Engine, Order, tuple[OrderItem, ...]]:
    """An order of ``units`` items, loaded (with its items) by a session that is closed."""
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    now = datetime(2026, 1, 1)
    with Session(engine) as session:
        order = Order(order_ref="R-1", process="P", currency="EUR", data="{}",
                      goods_total=Decimal("1.00"), created_at=now)
        for n in range(units):
            order.items.append(OrderItem(line_no=n, sku=f"S{n}", name="n", process="P",
                                         unit_price_gross=Decimal("1.00"),
                                         tax_rate=Decimal("19"), state="a",
                                         state_entered_at=now))
        session.add(order)
        session.commit()
        order_id = order.id
    with Session(engine, expire_on_commit=False) as session:
        loaded = session.get_one(Order, order_id)
        items = tuple(loaded.items)
        session.commit()
    return engine, loaded, items


def test_take_up_attaches_what_adding_the_order_would_and_writes_their_changes() -> None:
    """``Runner._take_up`` attaches objects one by one instead of ``session.add(order)``'s
    cascade walk: the same objects end up in the session (the intent's items and the rest
    of the order's loaded items), with no statement, and a change to one is flushed."""
    engine, order, items = _detached_order(3)
    with Session(engine) as reference:
        reference.add(order)
        expected = {id(o) for o in reference}
        reference.expunge_all()
    assert expected == {id(order), *(id(i) for i in items)}
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with Session(engine) as session, session.begin():
        runner = cast(Runner, SimpleNamespace(session=session))
        taken, taken_items = Runner._take_up(runner, Loaded(order, items[:2]))
        assert taken is order and taken_items == list(items[:2])
        assert {id(o) for o in session} == expected
        assert all(obj in session for obj in (order, *items))
        assert not statements and not session.dirty and not session.new
        Runner._take_up(runner, Loaded(order, items[:2]))  # again: nothing changes
        assert {id(o) for o in session} == expected
        changed = items[2].id
        items[2].last_error = "changed"
        session.flush()
    assert any(s.lstrip().upper().startswith("UPDATE") for s in statements)
    with Session(engine) as check:
        assert check.get_one(OrderItem, changed).last_error == "changed"
