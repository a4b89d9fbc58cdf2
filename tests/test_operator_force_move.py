"""Forced moves (issue 13, point 3): `order move` / `Engine.force_move`, on every dialect."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from ratepay_oms import Engine
from ratepay_oms.cli import main
from ratepay_oms.engine.errors import OrderLockedError, OrderNotFoundError
from ratepay_oms.engine.forced import ForcedMoveError
from ratepay_oms.persistence.models import (
    EventTimeout,
    Order,
    OrderItem,
    StateHistory,
    TransitionLog,
)
from tests.operator_helpers import PROCESS, PROCESS_DIR, new_ref, operator_engine
from tests.plugins_for_tests import command_runs, order_doc

T0 = datetime(2025, 6, 2, 12, 0, 0)


@pytest.fixture
def engine(server_db_url: str) -> Iterator[Engine]:
    with operator_engine(server_db_url) as eng:
        yield eng


def in_review(engine: Engine, qty: int = 2) -> tuple[str, list[int]]:
    ref = new_ref()
    view = engine.place_order(order_doc(ref, PROCESS, (("A", qty),)), now=T0)
    assert {i.state for i in view.items} == {"review"}
    return ref, [i.id for i in view.items]


def audit_rows(engine: Engine, ref: str) -> tuple[int, int, int]:
    with engine.session() as s:
        order_id = s.scalar(select(Order.id).where(Order.order_ref == ref))
        return (
            int(s.scalar(select(func.count()).where(StateHistory.order_id == order_id)) or 0),
            int(s.scalar(select(func.count()).where(TransitionLog.order_id == order_id)) or 0),
            int(
                s.scalar(
                    select(func.count())
                    .select_from(EventTimeout)
                    .join(OrderItem, OrderItem.id == EventTimeout.item_id)
                    .where(OrderItem.order_id == order_id)
                )
                or 0
            ),
        )


def test_forced_move_is_written_like_a_move_and_marked_with_who_and_why(engine: Engine) -> None:
    ref, (first, second) = in_review(engine)
    at = T0 + timedelta(hours=5)
    result = engine.force_move(
        ref, first, "ready", reason="approved by phone, ticket 4711", by="alice", now=at
    )
    assert (result.from_state, result.to_state, result.actor) == ("review", "ready", "alice")
    view = engine.order(ref)
    states = {i.id: (i.state, i.state_entered_at) for i in view.items}
    assert states[first] == ("ready", at)
    assert states[second] == ("review", T0)
    last = engine.history(ref)[-1]
    assert (last.item_id, last.from_state, last.to_state, last.event) == (
        first, "review", "ready", None
    )
    assert (last.forced, last.actor) == (True, "alice")
    assert last.reason == "approved by phone, ticket 4711"
    assert not any(h.forced for h in engine.history(ref)[:-1])
    log = [e for e in engine.transition_log(ref) if e.item_id == first][-1]
    assert (log.forced, log.actor, log.reason, log.command) == (
        True, "alice", "approved by phone, ticket 4711", None
    )
    # the review state's timeout (escalate in 5 days) went with it; the other item keeps its
    with engine.session() as s:
        timeouts = dict(s.execute(select(EventTimeout.item_id, EventTimeout.event)).all())
    assert first not in timeouts and timeouts[second] == "escalate"
    assert command_runs(engine.database_url) == []  # no command ran


def test_forced_move_runs_no_command_and_the_next_tick_carries_on(fresh_db_url: str) -> None:
    with operator_engine(fresh_db_url) as engine:
        _next_tick_carries_on(engine)


def _next_tick_carries_on(engine: Engine) -> None:
    ref, (item, _) = in_review(engine)
    engine.force_move(ref, item, "new", reason="start over", by="bob", now=T0)
    assert engine.order(ref).items[0].state == "new"
    engine.tick(now=T0 + timedelta(minutes=1))  # new's on-enter event takes it on
    assert engine.order(ref).items[0].state == "review"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"to_state": "ready", "reason": "  "}, "needs a reason"),
        ({"to_state": "redy", "reason": "x"}, "'redy' is not a state of process OperatorFlow01 "
                                              "(did you mean 'ready'?)"),
        ({"to_state": "review", "reason": "x"}, "is in 'review' already"),
        ({"to_state": "ready", "reason": "x", "by": "x" * 101}, "longer than 100"),
    ],
)
def test_forced_move_refusals_write_nothing(
    engine: Engine, kwargs: dict[str, Any], message: str
) -> None:
    ref, (item, _) = in_review(engine)
    before = audit_rows(engine, ref)
    args = dict(kwargs)
    to_state = args.pop("to_state")
    with pytest.raises(ForcedMoveError, match=re.escape(message)):
        engine.force_move(ref, item, to_state, now=T0, **args)
    assert audit_rows(engine, ref) == before
    assert engine.order(ref).items[0].state == "review"


def test_forced_move_refuses_another_orders_item_and_unknown_orders(engine: Engine) -> None:
    ref, _ = in_review(engine)
    _, (foreign, _) = in_review(engine)
    with pytest.raises(ForcedMoveError, match=f"item {foreign} is not an item of order {ref}"):
        engine.force_move(ref, foreign, "ready", reason="x")
    with pytest.raises(OrderNotFoundError):
        engine.force_move("no-such-order", foreign, "ready", reason="x")


def test_forced_move_refused_while_an_intent_is_open(engine: Engine) -> None:
    ref, (item, _) = in_review(engine)
    with engine.session() as s, s.begin():
        s.execute(update(OrderItem).where(OrderItem.id == item).values(intent_id=987654))
    before = audit_rows(engine, ref)
    with pytest.raises(ForcedMoveError, match="gateway call intent 987654"):
        engine.force_move(ref, item, "ready", reason="x")
    assert audit_rows(engine, ref) == before


def test_forced_move_refused_while_another_worker_holds_the_lease(engine: Engine) -> None:
    ref, (item, _) = in_review(engine)
    other = Engine(engine.database_url, definitions=engine.definitions(),
                   registry=engine.registry, worker_id="other-worker")
    try:
        with engine.session() as s:
            order_id = s.scalar(select(Order.id).where(Order.order_ref == ref))
        assert other.claims.claim([order_id]) == [order_id]
        with pytest.raises(OrderLockedError, match="being worked on by other-worker"):
            engine.force_move(ref, item, "ready", reason="x")
        other.claims.release([order_id])
        engine.force_move(ref, item, "ready", reason="x")
        assert engine.order(ref).items[0].state == "ready"
    finally:
        other.close()


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_order_move_cli_and_history_shows_it_distinctly(
    engine: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("RATEPAY_OMS_PLUGINS", "tests.operator_helpers:register")
    ref, (item, _) = in_review(engine)
    base = ["--db", engine.database_url, "--processes", PROCESS_DIR]
    code, out, err = run(capsys, "order", "move", ref, "--item", item, "--to", "ready", *base)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "needs a reason" in err and "Traceback" not in err

    code, out, err = run(capsys, "order", "move", ref, "--item", item, "--to", "ready",
                         "--reason", "customer called", "--by", "carol", "--json", *base)
    assert code == 0, err
    data = json.loads(out)
    assert (data["from_state"], data["to_state"], data["forced"], data["actor"]) == (
        "review", "ready", True, "carol"
    )
    code, out, _ = run(capsys, "order", "history", ref, *base)
    assert code == 0
    [line] = [x for x in out.splitlines() if "review → ready" in x]
    assert "FORCED by carol: customer called" in line
    code, out, _ = run(capsys, "order", "history", ref, "--json", *base)
    forced = [e for e in json.loads(out) if e["forced"]]
    assert [(e["item_id"], e["actor"], e["reason"]) for e in forced] == [
        (item, "carol", "customer called")
    ]
