"""The engine's rules, one scenario per test, on every dialect of ``server_db_url``.

Processes come from ``tests/processes/engine/*.yaml`` through the real loader; commands and
conditions from ``tests/plugins_for_tests.py``. Each test starts by removing the rows of the
test processes, so tests never see each other's orders.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, SessionTransaction

from ratepay_oms import Engine
from ratepay_oms.engine.errors import (
    ManualEventError,
    OrderLockedError,
    OrderNotFoundError,
    UnknownProcessError,
)
from ratepay_oms.engine.plugins import CommandContext, Condition
from ratepay_oms.engine.runner import MAX_EVENT_REPEATS
from ratepay_oms.orders import OrderInputError
from ratepay_oms.persistence.models import (
    EventTimeout,
    Order,
    OrderItem,
    StateHistory,
    TransitionLog,
)
from ratepay_oms.process.model import EventDef, ProcessDefinition, StateDef, TransitionDef
from tests.plugins_for_tests import (
    PROCESS_DIR,
    command_runs,
    make_registry,
    order_doc,
    prepare_database,
)

T0 = datetime(2025, 3, 1, 12, 0, 0)


@pytest.fixture
def url(server_db_url: str) -> str:
    prepare_database(server_db_url)
    return server_db_url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    eng = Engine(url, process_dir=PROCESS_DIR, registry=make_registry(), worker_id="test-worker")
    yield eng
    eng.close()


def ref() -> str:
    return f"T-{uuid.uuid4().hex[:10]}"


def counts(engine: Engine, order_ref: str) -> tuple[int, int, int]:
    """(history rows, log rows, timeout rows) of an order: 'nothing written' checks."""
    with engine.session() as s:
        order_id = s.scalar(select(Order.id).where(Order.order_ref == order_ref))
        hist = s.scalar(select(func.count()).where(StateHistory.order_id == order_id))
        logs = s.scalar(select(func.count()).where(TransitionLog.order_id == order_id))
        timeouts = s.scalar(
            select(func.count())
            .select_from(EventTimeout)
            .join(OrderItem, OrderItem.id == EventTimeout.item_id)
            .where(OrderItem.order_id == order_id)
        )
        return int(hist or 0), int(logs or 0), int(timeouts or 0)


# -- placing an order and the on-enter cascade ------------------------------------------------


def test_place_order_splits_units_and_cascades_through_several_states(engine: Engine) -> None:
    r = ref()
    view = engine.place_order(order_doc(r, lines=(("SKU-A", 2), ("SKU-B", 1))), now=T0)

    assert [i.sku for i in view.items] == ["SKU-A", "SKU-A", "SKU-B"]
    assert [i.line_no for i in view.items] == [0, 0, 1]
    assert view.states() == {"authorized": 3}  # new -> reserved -> authorized in one call
    assert view.goods_total == Decimal("30.00")
    history = engine.history(r)
    per_item = Counter(h.item_id for h in history)
    assert set(per_item.values()) == {3}
    first = [h for h in history if h.item_id == view.items[0].id]
    assert [(h.from_state, h.to_state, h.event) for h in first] == [
        (None, "new", None),
        ("new", "reserved", "reserve"),
        ("reserved", "authorized", "authorize"),
    ]


def test_place_order_without_firing_leaves_the_cascade_to_the_tick(engine: Engine) -> None:
    r = ref()
    view = engine.place_order(order_doc(r), now=T0, fire=False)
    assert view.states() == {"new": 3}
    assert command_runs(engine.database_url) == []

    result = engine.tick(now=T0)

    assert engine.order(r).states() == {"authorized": 3}
    assert result.items_moved == 6
    assert result.commands_run == 1
    assert result.orders_seen == 1


def test_duplicate_order_ref_and_unknown_process_are_refused(engine: Engine) -> None:
    r = ref()
    engine.place_order(order_doc(r), now=T0)
    with pytest.raises(OrderInputError, match="exists already"):
        engine.place_order(order_doc(r), now=T0)
    with pytest.raises(UnknownProcessError, match="EngineFlow01"):
        engine.place_order(order_doc(ref(), process="NoSuchProcess01"), now=T0)
    assert len(engine.orders(process="EngineFlow01")) == 1


# -- grouping: by order vs by item -----------------------------------------------------------


def test_by_order_command_runs_once_per_order_group_with_all_its_items(engine: Engine) -> None:
    a, b = ref(), ref()
    engine.place_order(order_doc(a, lines=(("SKU-A", 2), ("SKU-B", 1))), now=T0, fire=False)
    engine.place_order(order_doc(b, lines=(("SKU-C", 2),)), now=T0, fire=False)

    engine.tick(now=T0)

    runs = [r for r in command_runs(engine.database_url) if r["command"] == "Test/RecordByOrder"]
    calls: dict[str, set[str]] = {}
    for run in runs:
        calls.setdefault(run["call_id"], set()).add(run["order_ref"])
    assert len(calls) == 2  # one call per order
    assert all(len(refs) == 1 for refs in calls.values())
    items_per_call = Counter(r["call_id"] for r in runs)
    assert sorted(items_per_call.values()) == [2, 3]


def test_by_item_command_runs_once_per_item(engine: Engine) -> None:
    r = ref()
    view = engine.place_order(order_doc(r, lines=(("SKU-A", 3),)), now=T0)

    result = engine.trigger("ship", r, now=T0)

    runs = [x for x in command_runs(engine.database_url) if x["command"] == "Test/RecordByItem"]
    assert len({x["call_id"] for x in runs}) == 3
    assert sorted(x["item_id"] for x in runs) == [i.id for i in view.items]
    # ship, then the on-enter 'deliver' of the new state, both reported
    assert {(s, t) for _, s, t in result.moved} == {
        ("authorized", "shipped"),
        ("shipped", "delivered"),
    }
    assert engine.order(r).states() == {"delivered": 3}


# -- conditions -------------------------------------------------------------------------------


def test_passing_condition_wins_over_the_unconditional_fallback(engine: Engine) -> None:
    # The fallback is declared first in the YAML; the conditional transition must still win.
    engine.services["flagged"] = {"SKU-B"}
    r = ref()
    view = engine.place_order(order_doc(r, lines=(("SKU-A", 1), ("SKU-B", 1))), now=T0)

    assert {i.sku: i.state for i in view.items} == {"SKU-A": "authorized", "SKU-B": "flagged"}
    log = {(e.item_id, e.event): e for e in engine.transition_log(r)}
    b_id = next(i.id for i in view.items if i.sku == "SKU-B")
    a_id = next(i.id for i in view.items if i.sku == "SKU-A")
    assert log[(b_id, "authorize")].condition == "Test/IsFlagged"
    assert log[(a_id, "authorize")].condition is None


def test_eventless_condition_is_polled_by_the_tick(engine: Engine) -> None:
    engine.services["flagged"] = {"SKU-B"}
    r = ref()
    engine.place_order(order_doc(r, lines=(("SKU-B", 1),)), now=T0)

    first = engine.tick(now=T0)
    assert engine.order(r).states() == {"flagged": 1}
    assert first.items_moved == 0

    engine.services["cleared"] = {"SKU-B"}
    second = engine.tick(now=T0)
    assert engine.order(r).states() == {"authorized": 1}
    assert second.items_moved == 1


class _Flagged(Condition):
    """``Test/IsFlagged`` as a class that says whether it reads the database (``reads``; an
    exception: raised by ``reads_database``) and can fail its check (``fails``)."""

    def __init__(self, reads: bool | Exception, fails: bool = False) -> None:
        self.reads = reads
        self.fails = fails

    def check(self, ctx: CommandContext, order: Order, item: OrderItem) -> bool:
        if self.fails:
            raise ValueError("condition broke (test)")
        return item.sku in ctx.services.get("flagged", ())

    def reads_database(self, ctx: CommandContext, order: Order) -> bool:
        if isinstance(self.reads, Exception):
            raise self.reads
        return self.reads


def _place_flagged(
    url: str, monkeypatch: pytest.MonkeyPatch, condition: _Flagged
) -> tuple[dict[str, str], int, list[str | None]]:
    """Place an order whose ``authorize`` asks ``condition``: (states by SKU, savepoints
    begun, the errors of its transition log)."""
    registry = make_registry()
    registry.register_condition("Test/IsFlagged", condition)
    begun: list[int] = []
    begin_nested = Session.begin_nested

    def counting(self: Session) -> SessionTransaction:
        begun.append(1)
        return begin_nested(self)

    eng = Engine(url, process_dir=PROCESS_DIR, registry=registry, worker_id="test-worker")
    try:
        eng.services["flagged"] = {"SKU-B"}
        r = ref()
        monkeypatch.setattr(Session, "begin_nested", counting)
        view = eng.place_order(order_doc(r, lines=(("SKU-A", 1), ("SKU-B", 1))), now=T0)
        monkeypatch.undo()
        errors = [e.error_message for e in eng.transition_log(r)]
    finally:
        eng.close()
    return {i.sku: i.state for i in view.items}, len(begun), errors


def test_conditions_that_read_nothing_are_asked_without_a_savepoint(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Condition.reads_database`` false: the same choice, one savepoint fewer; a
    ``reads_database`` that raises counts as reading (the savepoint stays)."""
    chosen = {"SKU-A": "authorized", "SKU-B": "flagged"}
    states, guarded, errors = _place_flagged(url, monkeypatch, _Flagged(True))
    assert states == chosen and not any(errors)
    states, bare, errors = _place_flagged(url, monkeypatch, _Flagged(False))
    assert states == chosen and not any(errors)
    assert bare == guarded - 1
    states, unsure, _ = _place_flagged(url, monkeypatch, _Flagged(RuntimeError("unsure")))
    assert states == chosen and unsure == guarded


def test_a_condition_that_reads_nothing_and_fails_leaves_its_items_waiting(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the savepoint a failing condition still fails only its own items, each with
    the error logged, as with one."""
    results = [
        _place_flagged(url, monkeypatch, _Flagged(reads, fails=True)) for reads in (True, False)
    ]
    (states, _, errors), (bare_states, _, bare_errors) = results
    assert states == bare_states
    assert not {"authorized", "flagged"} & set(states.values())
    assert sorted(map(str, errors)) == sorted(map(str, bare_errors))
    assert any("condition broke (test)" in (e or "") for e in bare_errors)


# -- timeouts --------------------------------------------------------------------------------


def test_timeout_fires_after_90_days_and_not_before(engine: Engine) -> None:
    r = ref()
    engine.place_order(order_doc(r, lines=(("SKU-A", 2),)), now=T0)
    engine.trigger("ship", r, now=T0)
    assert counts(engine, r)[2] == 2  # one 'close' timeout per delivered item

    early = engine.tick(now=T0 + timedelta(days=89, hours=23))
    assert early.timeouts_fired == 0
    assert engine.order(r).states() == {"delivered": 2}

    due = engine.tick(now=T0 + timedelta(days=90))
    assert due.timeouts_fired == 2
    assert engine.order(r).states() == {"closed": 2}
    assert counts(engine, r)[2] == 0  # leaving the state dropped the timeouts
    closing = [h for h in engine.history(r) if h.to_state == "closed"]
    assert {h.created_at for h in closing} == {T0 + timedelta(days=90)}


# -- failures and retries --------------------------------------------------------------------


def test_raising_command_keeps_items_logs_error_and_retries_with_backoff(engine: Engine) -> None:
    engine.services["flaky"] = {"failures": 2}
    r = ref()
    view = engine.place_order(order_doc(r, process="EngineFlaky01"), now=T0)

    assert view.states() == {"new": 3}
    assert {i.attempts for i in view.items} == {1}
    assert {i.retry_at for i in view.items} == {T0 + timedelta(seconds=30)}
    assert {i.retry_event for i in view.items} == {"pay"}
    assert all("gateway unreachable" in (i.last_error or "") for i in view.items)
    errors = [e for e in engine.transition_log(r) if e.is_error]
    assert len(errors) == 3 and {e.target_state for e in errors} == {None}
    assert {e.command for e in errors} == {"Test/Flaky"}

    not_yet = engine.tick(now=T0 + timedelta(seconds=29))
    assert not_yet.commands_run == 0
    assert engine.order(r).states() == {"new": 3}

    again = engine.tick(now=T0 + timedelta(seconds=31))
    assert again.errors == 1 and again.retries_scheduled == 3
    items = engine.order(r).items
    assert {i.attempts for i in items} == {2}
    assert {i.retry_at for i in items} == {T0 + timedelta(seconds=31 + 60)}

    done = engine.tick(now=T0 + timedelta(seconds=31 + 61))
    assert done.errors == 0 and done.items_moved == 3
    items = engine.order(r).items
    assert {i.state for i in items} == {"paid"}
    assert {(i.attempts, i.retry_at, i.last_error) for i in items} == {(0, None, None)}
    runs = [x for x in command_runs(engine.database_url) if x["command"] == "Test/Flaky"]
    assert len(runs) == 3 and len({x["call_id"] for x in runs}) == 1


def test_what_a_failing_command_wrote_is_rolled_back(engine: Engine) -> None:
    r = ref()
    engine.place_order(order_doc(r, process="EngineFlaky01", lines=(("SKU-A", 1),)), now=T0)
    before = counts(engine, r)

    result = engine.trigger("write", r, now=T0)

    assert result.moved == [] and len(result.errors) == 1
    assert "failed after writing" in result.errors[0]
    assert engine.order(r).states() == {"paid": 1}
    assert [
        x for x in command_runs(engine.database_url) if x["command"] == "Test/WriteThenFail"
    ] == []
    hist, logs, _ = counts(engine, r)
    assert hist == before[0] and logs == before[1] + 1  # only the error row


def test_backoff_doubles_and_is_capped_at_one_hour() -> None:
    from ratepay_oms.engine.clock import retry_delay

    assert [retry_delay(n).total_seconds() for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert retry_delay(8) == timedelta(hours=1)
    assert retry_delay(200) == timedelta(hours=1)


def test_loop_guard_stops_an_on_enter_cycle(engine: Engine) -> None:
    r = ref()
    engine.place_order(order_doc(r, process="EngineLoop01", lines=(("SKU-A", 1),)), now=T0)

    result = engine.trigger("start", r, now=T0)

    assert len(result.errors) == 1 and "loop guard" in result.errors[0]
    pongs = [m for m in result.moved if m[1:] == ("ping", "pong")]
    assert len(pongs) == MAX_EVENT_REPEATS
    errors = [e for e in engine.transition_log(r) if e.is_error]
    assert len(errors) == 1 and errors[0].source_state == "ping"


# -- manual triggers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ("deliver", "not manual"),
        ("close", "not manual in process EngineFlow01: it fires by its timeout"),
        ("explode", "unknown event 'explode'"),
    ],
)
def test_non_manual_or_unknown_event_is_refused_and_writes_nothing(
    engine: Engine, event: str, message: str
) -> None:
    r = ref()
    engine.place_order(order_doc(r, lines=(("SKU-A", 1),)), now=T0)
    before = counts(engine, r)
    with pytest.raises(ManualEventError, match=message):
        engine.trigger(event, r, now=T0)
    assert counts(engine, r) == before
    assert engine.order(r).states() == {"authorized": 1}


def test_manual_trigger_refuses_items_in_the_wrong_state(engine: Engine) -> None:
    r = ref()
    view = engine.place_order(order_doc(r, lines=(("SKU-A", 2),)), now=T0)
    first, second = (i.id for i in view.items)
    engine.trigger("ship", r, [first], now=T0)
    before = counts(engine, r)

    with pytest.raises(ManualEventError) as caught:
        engine.trigger("ship", r, [first, second], now=T0)
    assert f"item {first} is in 'delivered'" in str(caught.value)
    with pytest.raises(ManualEventError, match="not an item of order"):
        engine.trigger("ship", r, [second, 10**9], now=T0)
    assert counts(engine, r) == before
    assert {i.id: i.state for i in engine.order(r).items} == {
        first: "delivered",
        second: "authorized",
    }
    with pytest.raises(OrderNotFoundError):
        engine.trigger("ship", "no-such-order", now=T0)


def test_trigger_respects_a_live_lease_and_takes_over_an_expired_one(engine: Engine) -> None:
    r = ref()
    engine.place_order(order_doc(r, lines=(("SKU-A", 1),)), now=T0)
    with engine.session() as s, s.begin():
        s.execute(
            update(Order)
            .where(Order.order_ref == r)
            .values(claimed_by="other-worker", claim_expires_at=datetime(2999, 1, 1))
        )
    with pytest.raises(OrderLockedError, match="other-worker"):
        engine.trigger("cancel", r, now=T0)
    assert engine.order(r).states() == {"authorized": 1}

    with engine.session() as s, s.begin():
        s.execute(
            update(Order).where(Order.order_ref == r).values(claim_expires_at=datetime(2000, 1, 1))
        )
    engine.trigger("cancel", r, now=T0)
    view = engine.order(r)
    assert view.states() == {"cancelled": 1}
    assert view.claimed_by is None  # released after the work


# -- views and definitions built in code --------------------------------------------------------


def test_order_view_json_has_money_as_strings(engine: Engine) -> None:
    r = ref()
    engine.place_order(order_doc(r, lines=(("SKU-A", 1),)), now=T0)
    doc = engine.order(r).to_json()
    assert doc["order_ref"] == r and doc["process"] == "EngineFlow01"
    item = doc["items"][0]
    assert item["unit_price_gross"] == "10.00"
    assert item["state"] == "authorized" and item["attempts"] == 0
    assert item["state_entered_at"] == T0.isoformat()
    assert doc["data"]["order_ref"] == r
    # The database is shared with other tests: look for this order among the others.
    assert r in [v.order_ref for v in engine.orders(state="authorized")]
    assert r not in [v.order_ref for v in engine.orders(state="shipped")]


def test_engine_runs_definitions_built_in_code(url: str) -> None:
    definition = ProcessDefinition(
        name="EngineCode01",
        initial="new",
        states={n: StateDef(n) for n in ("new", "done")},
        events={"finish": EventDef("finish", on_enter=True, command="Test/RecordByOrder")},
        transitions=(TransitionDef("new", "done", event="finish"),),
    )
    engine = Engine(url, definitions={"EngineCode01": definition}, registry=make_registry())
    try:
        r = ref()
        view = engine.place_order(order_doc(r, process="EngineCode01"), now=T0)
        assert view.states() == {"done": 3}
        assert set(engine.definitions()) == {"EngineCode01"}
    finally:
        engine.close()
