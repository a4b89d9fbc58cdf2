"""Gateway calls in flight at once (``tick(concurrency=K)``), one per order, and leases that
cover only the work being done: a test external command whose ``send`` the test controls.

Every order takes two calls in a row (``new`` → ``first`` → ``second`` → ``done``); each call
records when it started and ended, per order, in memory (the tick runs in this process).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ratepay_oms import Engine
from ratepay_oms.engine.clock import wall_now
from ratepay_oms.engine.errors import OrderLockedError
from ratepay_oms.engine.plugins import (
    CallContext,
    CommandContext,
    ExternalCommand,
    PluginRegistry,
    PreparedCall,
    Reconciled,
)
from ratepay_oms.ops import instruments
from ratepay_oms.persistence.db import upgrade
from ratepay_oms.persistence.models import Order, OrderItem
from tests.plugins_for_tests import order_doc

PROCESS = """
process: Drive01
initial: new
states:
  new:
  first:
  second:
  done:
  cancelled:
transitions:
  - {source: new, target: first, event: go}
  - {source: first, target: second, event: again}
  - {source: second, target: done, event: finish}
  - {source: new, target: cancelled, event: cancel}
  - {source: first, target: cancelled, event: cancel}
events:
  go: {on_enter: true, command: Drive/Call}
  again: {on_enter: true, command: Drive/Call}
  finish: {on_enter: true}
  cancel: {manual: true}
"""


@dataclass
class Gateway:
    """What the test's calls did, guarded by one lock (the calls run on worker threads)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    most_in_flight: int = 0
    calls: list[tuple[str, str, float, float]] = field(default_factory=list)
    """(order ref, state, start, end) per call."""
    gather: threading.Barrier | None = None
    """The first ``parties`` calls wait here for each other (proves they overlap)."""
    gathered: int = 0
    hold: threading.Event | None = None
    """Calls wait for this to be set (a call kept in flight as long as the test likes)."""
    started: threading.Event = field(default_factory=threading.Event)
    lease_check: Any = None
    """Called with the order ref at the end of each call."""
    no_call: set[str] = field(default_factory=set)
    """Orders whose plan decides without a call (every state)."""


class Call(ExternalCommand[dict[str, str], str]):
    def plan(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> PreparedCall[dict[str, str]]:
        if order.order_ref in ctx.services["gateway"].no_call:
            return None
        summary = {"order": order.order_ref, "state": items[0].state}
        return PreparedCall(summary, dict(summary))

    def send(self, call: PreparedCall[dict[str, str]], io: CallContext) -> str:
        gw: Gateway = io.services["gateway"]
        with gw.lock:
            gw.in_flight += 1
            gw.most_in_flight = max(gw.most_in_flight, gw.in_flight)
            gw.gathered += 1
            wait = gw.gather is not None and gw.gathered <= gw.gather.parties
        start = time.monotonic()
        gw.started.set()
        try:
            if wait:
                assert gw.gather is not None
                gw.gather.wait()
            if gw.hold is not None:
                assert gw.hold.wait(timeout=60)
            time.sleep(0.01)
            if gw.lease_check is not None:
                gw.lease_check(call.payload["order"])
        finally:
            with gw.lock:
                gw.in_flight -= 1
                gw.calls.append((call.payload["order"], call.payload["state"], start,
                                 time.monotonic()))
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


def _engine(url: str, tmp_path: Path, lease_seconds: int) -> tuple[Engine, Gateway]:
    upgrade(url)
    pdir = tmp_path / "processes"
    pdir.mkdir(exist_ok=True)
    (pdir / "Drive01.yaml").write_text(PROCESS, encoding="utf-8")
    registry = PluginRegistry()
    registry.register_external("Drive/Call", Call())
    gateway = Gateway()
    engine = Engine(
        url, process_dir=pdir, registry=registry, services={"gateway": gateway},
        lease_seconds=lease_seconds,
    )
    return engine, gateway


@pytest.fixture
def world(fresh_db_url: str, tmp_path: Path) -> Iterator[tuple[Engine, Gateway]]:
    engine, gateway = _engine(fresh_db_url, tmp_path, 60)
    yield engine, gateway
    engine.close()


def _lease_checker(engine: Engine) -> Any:
    def lease_held(ref: str) -> None:
        with engine.session() as s:
            order = s.query(Order).filter_by(order_ref=ref).one()
            assert order.claimed_by == engine.worker_id
            assert order.claim_expires_at is not None and order.claim_expires_at > wall_now()

    return lease_held


def _place(engine: Engine, n: int) -> list[str]:
    refs = [f"D-{uuid.uuid4().hex[:8]}" for _ in range(n)]
    for ref in refs:
        engine.place_order(order_doc(ref, process="Drive01", lines=(("SKU-A", 1),)), fire=False)
    return refs


def test_a_tick_keeps_k_calls_in_flight_one_per_order_in_order(
    world: tuple[Engine, Gateway],
) -> None:
    engine, gateway = world
    refs = _place(engine, 8)
    # The first four calls only return once all four are in flight: with fewer at once the
    # barrier times out (BrokenBarrierError in a call: intents left open, the test fails).
    gateway.gather = threading.Barrier(4, timeout=30)

    gateway.lease_check = _lease_checker(engine)  # ours while the call is in flight
    result = engine.tick(concurrency=4)

    assert result.errors == 0, result.error_messages
    assert gateway.most_in_flight == 4
    for ref in refs:
        view = engine.order(ref)
        assert view.states() == {"done": 1}
        assert view.claimed_by is None  # released with the last settle
        mine = sorted((c for c in gateway.calls if c[0] == ref), key=lambda c: c[2])
        assert [c[1] for c in mine] == ["new", "first"]  # the order's calls in their order
        assert mine[0][3] <= mine[1][2]  # never two calls of one order at once
    assert not engine.intents()


def test_concurrency_one_makes_one_call_at_a_time(world: tuple[Engine, Gateway]) -> None:
    engine, gateway = world
    refs = _place(engine, 3)
    result = engine.tick(concurrency=1)
    assert result.errors == 0, result.error_messages
    assert gateway.most_in_flight == 1
    assert all(engine.order(r).states() == {"done": 1} for r in refs)


def test_a_manual_event_on_a_merely_due_order_is_not_refused(
    world: tuple[Engine, Gateway],
) -> None:
    """While the tick's call on one order is in flight, another order that is only due (its
    call not started) takes a manual event; the order with the call in flight refuses one."""
    engine, gateway = world
    busy, due = _place(engine, 2)
    gateway.hold = threading.Event()
    ticking = threading.Thread(target=lambda: engine.tick(concurrency=1))
    ticking.start()
    try:
        assert gateway.started.wait(timeout=60)
        assert engine.order(busy).items[0].intent_id is not None  # its call is in flight
        assert engine.order(due).items[0].intent_id is None  # merely due: not leased
        assert engine.order(due).claimed_by is None

        result = engine.trigger("cancel", due)
        assert result.moved and not result.errors
        with pytest.raises(OrderLockedError, match="being worked on"):
            engine.trigger("cancel", busy)
    finally:
        gateway.hold.set()
        ticking.join(timeout=60)
    assert engine.order(due).states() == {"cancelled": 1}
    assert engine.order(busy).states() == {"done": 1}
    assert engine.order(busy).claimed_by is None


def test_the_lease_is_renewed_while_a_call_outlasts_it(fresh_db_url: str, tmp_path: Path) -> None:
    """A 2 s lease, a call held for 5 s: without renewal the lease would have run out under
    the call (and another worker could reconcile an intent still in flight)."""
    engine, gateway = _engine(fresh_db_url, tmp_path, 2)
    try:
        (ref,) = _place(engine, 1)
        gateway.hold = threading.Event()
        gateway.lease_check = _lease_checker(engine)
        timer = threading.Timer(5.0, gateway.hold.set)
        timer.start()
        result = engine.tick(concurrency=1)
        timer.join()
        assert result.errors == 0, result.error_messages
        assert engine.order(ref).states() == {"done": 1}
        assert engine.order(ref).claimed_by is None
    finally:
        engine.close()


def test_an_order_that_gets_no_call_after_all_is_not_left_leased(
    world: tuple[Engine, Gateway],
) -> None:
    """The first order of the batch looks like it will call (so on PostgreSQL its lock
    statement leases it ahead), but its plan decides without a call: its lease is gone when
    the batch commits, i.e. already while the next order's call is in flight."""
    engine, gateway = world
    quiet, calling = _place(engine, 2)
    gateway.no_call.add(quiet)
    seen: list[str | None] = []

    def check(ref: str) -> None:
        _lease_checker(engine)(ref)
        seen.append(engine.order(quiet).claimed_by)

    gateway.lease_check = check
    result = engine.tick(concurrency=1)
    assert result.errors == 0, result.error_messages
    assert engine.order(quiet).states() == {"done": 1}
    assert engine.order(calling).states() == {"done": 1}
    assert [c[0] for c in gateway.calls] == [calling, calling]
    assert seen == [None, None]
    assert engine.order(quiet).claimed_by is None
    assert engine.order(calling).claimed_by is None


def test_an_expired_lease_is_taken_over_counted_and_ours_during_the_call(
    world: tuple[Engine, Gateway],
) -> None:
    """A worker died holding the order's lease: once it expired, the tick takes the order
    over (counted once), holds the lease itself while its call is in flight and drops it."""
    engine, gateway = world
    (ref,) = _place(engine, 1)
    with engine.session() as session, session.begin():
        order = session.query(Order).filter_by(order_ref=ref).one()
        order.claimed_by, order.claim_expires_at = "dead-worker", wall_now() - timedelta(seconds=1)
    gateway.lease_check = _lease_checker(engine)
    before = instruments.sample("ratepay_oms_lease_takeovers_total", {})
    result = engine.tick(concurrency=1)
    assert result.errors == 0, result.error_messages
    assert instruments.sample("ratepay_oms_lease_takeovers_total", {}) == before + 1
    assert [c[0] for c in gateway.calls] == [ref, ref]
    assert engine.order(ref).states() == {"done": 1}
    assert engine.order(ref).claimed_by is None
