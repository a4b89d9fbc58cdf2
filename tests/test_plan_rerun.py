"""A gateway command's plan that raises, without a savepoint around plans: the drive rolls the
transaction back and runs its work again with that plan known to fail (``Drive.transact``,
``Replan``). What commits must be what a savepoint around each plan left: the other orders'
moves and intents, the failing order's items where the plan found them with its error, a
retry and an error row per item; and no SAVEPOINT statement on the way.

A test external command (``Replan/Call``) whose plan raises for the orders the test names, at
the state the test names; everything else is real (database, drive, tick, settle).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ratepay_oms import Engine
from ratepay_oms.engine.clock import retry_delay
from ratepay_oms.engine.plugins import (
    CallContext,
    CommandContext,
    ExternalCommand,
    PluginRegistry,
    PreparedCall,
    Reconciled,
)
from ratepay_oms.engine.runner import REPLANS
from ratepay_oms.persistence.db import upgrade
from ratepay_oms.persistence.models import Order, OrderItem
from tests.plugins_for_tests import order_doc

PROCESS = """
process: Replan01
initial: new
states:
  new:
  waiting:
  called:
  again:
  done:
transitions:
  - {source: new, target: waiting, event: start}
  - {source: waiting, target: called, event: call}
  - {source: called, target: again, event: call again}
  - {source: again, target: done, event: finish}
events:
  start: {on_enter: true}
  call: {on_enter: true, command: Replan/Call}
  call again: {on_enter: true, command: Replan/Call}
  finish: {manual: true}
"""

T0 = datetime(2026, 3, 1, 12, 0, 0)


class Call(ExternalCommand[str, str]):
    """Plans a call; raises for (order ref, state) pairs in ``services["fail"]``, after writing
    (a stray order row change that must not survive the failing plan)."""

    def plan(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall[str]:
        state = items[0].state
        # A plan reads the database (as the real ones do: a savepoint is begun on first use).
        ctx.session.scalar(sa.select(sa.func.count(OrderItem.id)).where(
            OrderItem.order_id == order.id))
        if (order.order_ref, state) in ctx.services["fail"]:
            order.customer_ref = "written by a failing plan"
            ctx.session.flush()
            if ctx.services.get("how") == "flush":
                # A flush the database refuses: the session rolls back what it holds.
                ctx.session.add(Order(order_ref=order.order_ref, process="Replan01",
                                      currency="EUR", data="{}", goods_total=0,
                                      created_at=ctx.now))
                ctx.session.flush()
            raise RuntimeError(f"plan refused for {order.order_ref} in {state}")
        return PreparedCall({"order": order.order_ref, "state": state}, order.order_ref)

    def send(self, call: PreparedCall[str], io: CallContext) -> str:
        return "ok"

    def apply(
        self,
        ctx: CommandContext,
        order: Order,
        items: Sequence[OrderItem],
        summary: dict[str, Any],
        answer: str | Reconciled,
    ) -> None:
        assert answer == "ok"


@pytest.fixture
def engine(fresh_db_url: str, tmp_path: Path) -> Iterator[Engine]:
    upgrade(fresh_db_url)
    pdir = tmp_path / "processes"
    pdir.mkdir()
    (pdir / "Replan01.yaml").write_text(PROCESS, encoding="utf-8")
    registry = PluginRegistry()
    registry.register_external("Replan/Call", Call())
    engine = Engine(fresh_db_url, process_dir=pdir, registry=registry,
                    services={"fail": set()})
    yield engine
    engine.close()


class Statements:
    """Every statement the engine's database sees (a real ``before_cursor_execute`` hook)."""

    def __init__(self, db: sa.Engine) -> None:
        self.db = db
        self.seen: list[str] = []

    def _hook(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.seen.append(statement)

    def __enter__(self) -> Statements:
        sa.event.listen(self.db, "before_cursor_execute", self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.db, "before_cursor_execute", self._hook)

    def savepoints(self) -> int:
        return sum(1 for s in self.seen if "SAVEPOINT" in s.upper())


def _place(engine: Engine, prefix: str, count: int) -> list[str]:
    refs = [f"{prefix}-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    for ref in refs:
        engine.place_order(order_doc(ref, process="Replan01", lines=(("SKU-A", 2),)),
                           now=T0, fire=False)
    return refs


def _failed_as_a_savepoint_left_it(
    engine: Engine, ref: str, state: str, event: str, how: str = "raise"
) -> None:
    """Items where the plan found them, the plan's error, one attempt, a retry after the
    first backoff, one error row per item; no intent; nothing the plan wrote."""
    view = engine.order(ref)
    assert view.states() == {state: 2}
    assert {(i.attempts, i.retry_at, i.retry_event) for i in view.items} == {
        (1, T0 + retry_delay(1), event)
    }
    (message,) = {i.last_error for i in view.items}
    if how == "raise":
        assert message == f"RuntimeError: plan refused for {ref} in {state}"
    else:
        assert message is not None and message.startswith("IntegrityError: ")
    errors = [e for e in engine.transition_log(ref) if e.is_error]
    assert len(errors) == 2
    assert {(e.source_state, e.target_state, e.command) for e in errors} == {
        (state, None, "Replan/Call")
    }
    assert not engine.intents(ref, open_only=False) or state == "called"
    with engine.session() as session:
        order = session.scalar(sa.select(Order).where(Order.order_ref == ref))
        assert order is not None and order.customer_ref != "written by a failing plan"


@pytest.mark.parametrize(("failing", "how"), [(1, "raise"), (1, "flush"), (REPLANS + 1, "raise")])
def test_a_failing_plan_rolls_back_alone_without_a_savepoint(
    engine: Engine, failing: int, how: str
) -> None:
    """One tick batch holds every order's moves and plans; ``failing`` of them raise (or
    fail in a flush the database refuses). With more failing plans than the drive re-runs
    for, the last attempt falls back to a savepoint around each plan: the outcome is the
    same."""
    good = _place(engine, "GOOD", 2)
    bad = _place(engine, "BAD", failing)
    engine.services["fail"] = {(ref, "waiting") for ref in bad}
    engine.services["how"] = how
    with Statements(engine.db) as trace:
        result = engine.tick(now=T0, concurrency=8)
    for ref in good:
        assert engine.order(ref).states() == {"again": 2}
        assert [i.status for i in engine.intents(ref, open_only=False)] == ["settled"] * 2
    for ref in bad:
        _failed_as_a_savepoint_left_it(engine, ref, "waiting", "call", how)
    assert result.errors == failing and result.retries_scheduled == 2 * failing
    # Moves new -> waiting -> called -> again of the good orders, new -> waiting of the bad.
    assert result.items_moved == 2 * 3 * len(good) + 2 * failing
    assert result.commands_run == 2 * len(good) + failing
    if failing <= REPLANS:
        assert trace.savepoints() == 0
    else:
        assert trace.savepoints() > 0  # the fallback: a savepoint around each plan


def test_a_plan_failing_in_a_settles_cascade_keeps_the_settle(engine: Engine) -> None:
    """The settle of an order's first call moves its items and its on-enter cascade plans
    the second call, which raises: the settle commits (intent settled, items moved) and the
    second call's items fail where they landed, as with a savepoint."""
    (ref,) = _place(engine, "CASCADE", 1)
    engine.services["fail"] = {(ref, "called")}
    with Statements(engine.db) as trace:
        result = engine.tick(now=T0, concurrency=1)
    (intent,) = engine.intents(ref, open_only=False)
    assert intent.status == "settled"
    _failed_as_a_savepoint_left_it(engine, ref, "called", "call again")
    assert result.errors == 1 and result.retries_scheduled == 2
    assert trace.savepoints() == 0

    # The retry plans and sends it once the plan no longer fails.
    engine.services["fail"] = set()
    engine.tick(now=T0 + timedelta(minutes=5), concurrency=1)
    assert engine.order(ref).states() == {"again": 2}
    assert all(i.last_error is None for i in engine.order(ref).items)


def test_a_manual_event_whose_plan_fails_keeps_its_moves(engine: Engine) -> None:
    """``place_order`` with its cascade in one transaction: the plan fails after the first
    move; the order and that move commit, the items wait with a retry."""
    ref = f"PLACE-{uuid.uuid4().hex[:8]}"
    engine.services["fail"] = {(ref, "waiting")}
    with Statements(engine.db) as trace:
        engine.place_order(order_doc(ref, process="Replan01", lines=(("SKU-A", 2),)), now=T0)
    _failed_as_a_savepoint_left_it(engine, ref, "waiting", "call")
    assert trace.savepoints() == 0, [s for s in trace.seen if "SAVEPOINT" in s.upper()]
