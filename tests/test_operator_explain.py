"""`explain` (issue 13, point 1): why an item does not move, from what the engine recorded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from ratepay_oms import Engine
from ratepay_oms.cli import main
from ratepay_oms.engine.explain import ExplainError
from ratepay_oms.persistence.conditions import ConditionResult
from ratepay_oms.persistence.models import INTENT_PENDING, Intent, Order, OrderItem
from ratepay_oms.persistence.payment import PAYMENT_REQUEST
from tests.operator_helpers import PROCESS, PROCESS_DIR, new_ref, operator_engine
from tests.plugins_for_tests import order_doc

T0 = datetime(2025, 6, 2, 12, 0, 0)


@pytest.fixture
def engine(server_db_url: str) -> Iterator[Engine]:
    with operator_engine(server_db_url) as eng:
        yield eng


@pytest.fixture
def ticking(fresh_db_url: str) -> Iterator[Engine]:
    """For tests that tick: a tick works on every due row, so a database of their own."""
    with operator_engine(fresh_db_url) as eng:
        yield eng


def place(engine: Engine, *lines: tuple[str, int], fire: bool = True) -> tuple[str, list[int]]:
    ref = new_ref()
    view = engine.place_order(order_doc(ref, PROCESS, lines or (("A", 1),)), now=T0, fire=fire)
    return ref, [i.id for i in view.items]


def kinds(explanation: Any) -> list[str]:
    return [r.kind for r in explanation.reasons]


def test_a_false_condition_is_explained_with_its_time_and_what_it_read(ticking: Engine) -> None:
    engine = ticking
    ref, [item] = place(engine, ("A", 1))
    engine.tick(now=T0 + timedelta(minutes=5))  # asks the event-less condition: false
    [x] = engine.explain(ref, now=T0 + timedelta(hours=1)).items
    assert (x.state, x.since, x.status) == ("review", T0, "waiting")
    by_target = {t.target: t for t in x.transitions}
    assert by_target["approved"].kinds == ("event-less",)
    assert by_target["approved"].condition == "Operator/IsCleared"
    check = by_target["approved"].last_check
    assert check is not None and check.result is False
    assert check.evaluated_at == T0 + timedelta(minutes=5)
    assert check.read == {"sku": "A", "cleared": []}
    assert by_target["escalated"].kinds == ("timeout",)
    assert by_target["escalated"].timeout == "5 days"
    assert kinds(x) == ["condition", "timeout"]
    cond, timeout = x.reasons
    assert "condition Operator/IsCleared returned false at 2025-06-02 12:05:00" in cond.message
    assert '"cleared": []' in cond.message
    assert timeout.at == T0 + timedelta(days=5)
    assert "due at 2025-06-07 12:00:00" in timeout.message

    # the condition holds on the next tick: the newest answer replaces the old one
    engine.services["cleared"] = {"A"}
    engine.tick(now=T0 + timedelta(hours=2))
    with engine.session() as s:
        rows = s.execute(
            select(ConditionResult.result, ConditionResult.evaluated_at, ConditionResult.state)
            .where(ConditionResult.item_id == item)
        ).all()
    assert rows == [(True, T0 + timedelta(hours=2), "review")]
    [x] = engine.explain(ref, now=T0 + timedelta(hours=3)).items
    assert x.state == "approved"
    assert kinds(x) == ["manual"]
    assert "waiting for manual event 'prepare'" in x.reasons[0].message


def test_a_manual_event_whose_condition_failed_and_a_final_state(ticking: Engine) -> None:
    engine = ticking
    engine.services["cleared"] = {"OK"}
    ref, [ok, no] = place(engine, ("OK", 1), ("NO", 1))
    engine.tick(now=T0)
    engine.services["cleared"] = {"OK"}
    # NO stays in review; OK reaches approved → ready, then ship: its condition holds → shipped
    engine.trigger("prepare", ref, [ok], now=T0)
    engine.trigger("ship", ref, [ok], now=T0)
    engine.trigger("deliver", ref, [ok], now=T0)
    explanation = engine.explain(ref, now=T0 + timedelta(days=1))
    final, waiting = explanation.items
    assert (final.item_id, final.state, final.status, kinds(final)) == (ok, "done", "final",
                                                                      ["final"])
    assert final.transitions == ()
    assert waiting.item_id == no and waiting.state == "review"
    assert explanation.to_json()["items"][0]["in_state_for"] == "1 day"
    with pytest.raises(ExplainError, match="item 999999 is not an item of order"):
        engine.explain(ref, 999999)


def test_retry_after_an_error_is_explained_with_its_due_time(ticking: Engine) -> None:
    engine = ticking
    engine.services["cleared"] = {"A"}
    ref, _ = place(engine, ("A", 1))
    engine.tick(now=T0)
    engine.services["flaky"] = {"failures": 1}
    result = engine.trigger("prepare", ref, now=T0)
    assert result.errors
    [x] = engine.explain(ref, now=T0 + timedelta(seconds=10)).items
    assert x.state == "approved" and x.status == "waiting"
    retry = next(r for r in x.reasons if r.kind == "retry")
    assert retry.at == T0 + timedelta(seconds=30)
    assert "retry of prepare due at 2025-06-02 12:00:30 after error ConnectionError: " \
        "gateway unreachable (test)" in retry.message
    [later] = engine.explain(ref, now=T0 + timedelta(minutes=1)).items
    assert later.status == "due"
    assert "due now" in next(r for r in later.reasons if r.kind == "retry").message


def test_open_intent_and_lease_block_the_item(engine: Engine) -> None:
    ref, [item] = place(engine, ("A", 1))
    with engine.session() as s, s.begin():
        order_id = s.scalar(select(Order.id).where(Order.order_ref == ref))
        intent = Intent(order_id=order_id, process=PROCESS, state="review", event="escalate",
                        command="Test/Gateway", item_ids=json.dumps([item]),
                        summary=json.dumps({"describe": "test booking"}),
                        status=INTENT_PENDING, created_at=T0, worker="w-1")
        s.add(intent)
        s.flush()
        s.execute(update(OrderItem).where(OrderItem.id == item).values(intent_id=intent.id))
        intent_id = intent.id
    other = Engine(engine.database_url, definitions=engine.definitions(),
                   registry=engine.registry, worker_id="worker-7")
    try:
        assert other.claims.claim([order_id]) == [order_id]
        [x] = engine.explain(ref, now=T0).items
    finally:
        other.claims.release([order_id])
        other.close()
    assert x.status == "blocked"
    assert kinds(x)[:2] == ["intent", "lease"]
    assert f"waits for gateway call intent {intent_id}: test booking for items [{item}]" \
        in x.reasons[0].message
    assert x.reasons[0].detail["status"] == "pending"
    assert "lease held by worker worker-7 until" in x.reasons[1].message


def test_items_not_fired_yet_are_due(engine: Engine) -> None:
    ref, _ = place(engine, ("A", 1), fire=False)
    [x] = engine.explain(ref, now=T0).items
    assert (x.state, x.status) == ("new", "due")
    assert kinds(x) == ["on_enter"]
    assert "on-enter event 'start' has not fired yet" in x.reasons[0].message
    assert x.transitions[0].kinds == ("on-enter",)


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_cli_prints_text_and_json(
    ticking: Engine, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("RATEPAY_OMS_PLUGINS", "tests.operator_helpers:register")
    engine = ticking
    ref, [item] = place(engine, ("A", 1))
    engine.tick(now=T0)
    base = ["--db", engine.database_url, "--processes", PROCESS_DIR]
    now = ["--now", (T0 + timedelta(hours=4)).isoformat()]
    code, out, err = run(capsys, "explain", ref, *base, *now)
    assert code == 0, err
    assert f"item {item} (A) in 'review' since 2025-06-02 12:00:00 (4 hours): waiting" in out
    assert "→ approved: (event-less), if Operator/IsCleared [last: false at 2025-06-02 12:00:00]" \
        in out
    assert "- timeout 'escalate' due at 2025-06-07 12:00:00 (in 4 days 20 hours)" in out
    code, out, _ = run(capsys, "explain", ref, "--item", item, "--json", *base, *now)
    assert code == 0
    data = json.loads(out)
    [x] = data["items"]
    assert x["status"] == "waiting" and x["state"] == "review"
    assert [r["kind"] for r in x["reasons"]] == ["condition", "timeout"]
    assert x["reasons"][0]["detail"]["read"] == {"sku": "A", "cleared": []}
    code, out, err = run(capsys, "explain", "no-such-order", *base)
    assert code == 1 and "no order 'no-such-order'" in err and "Traceback" not in err


def test_ratepay_conditions_record_the_outcome_they_read(sandbox: Any, server_db_url: str) -> None:
    from ratepay_oms.demo import demo_engine, example_order

    eng = demo_engine(server_db_url, sandbox.settings)
    try:
        ref = new_ref()
        view = eng.place_order(example_order(ref, "INVOICE"))
        item = view.items[0].id
        with eng.session() as s:
            rows = {r.condition: r for r in s.scalars(
                select(ConditionResult).where(ConditionResult.item_id == item))}
        check = rows["Ratepay/IsPaymentRequestSuccess"]
        assert check.result is True
        read = json.loads(check.detail or "{}")
        assert read["action"] == PAYMENT_REQUEST
        assert read["outcome"]["success"] is True
        assert read["outcome"]["operation"] == "PAYMENT_REQUEST"
        [x] = [i for i in eng.explain(ref).items if i.item_id == item]
        assert x.state == "ready for shipment"
        assert {r.detail.get("event") for r in x.reasons if r.kind == "manual"} >= {"ship"}
    finally:
        eng.close()


def test_how_a_fallback_brought_the_item_here_is_explained(ticking: Engine) -> None:
    engine = ticking
    engine.services["cleared"] = {"A"}
    ref, [item] = place(engine, ("A", 1))
    engine.tick(now=T0)
    engine.trigger("prepare", ref, now=T0)
    engine.services["cleared"] = set()
    shipped_at = T0 + timedelta(hours=1)
    engine.trigger("ship", ref, now=shipped_at)  # condition false → fallback to escalated
    [x] = engine.explain(ref, now=shipped_at + timedelta(minutes=1)).items
    assert x.state == "escalated"
    assert x.arrival is not None
    assert (x.arrival.from_state, x.arrival.event, x.arrival.at) == ("ready", "ship", shipped_at)
    [check] = x.arrival.conditions
    assert (check.condition, check.result, check.read) == (
        "Operator/IsCleared", False, {"sku": "A", "cleared": []}
    )
    assert "came from 'ready' by 'ship' at 2025-06-02 13:00:00; condition Operator/IsCleared " \
        "returned false" in x.arrival.describe()
    engine.force_move(ref, item, "done", reason="sold off", by="dora", now=shipped_at)
    [y] = engine.explain(ref, now=shipped_at).items
    assert y.arrival is not None and y.arrival.forced
    assert y.arrival.describe() == ("forced here from 'escalated' at 2025-06-02 13:00:00 by "
                                    "dora: sold off")
    assert y.to_json()["arrival"]["reason"] == "sold off"


def test_condition_rows_keep_every_character_of_what_was_read(engine: Engine) -> None:
    """The rows go to the database as one set-based statement per chunk (a JSON parameter on
    PostgreSQL and SQLite): names, detail and time come back exactly, text outside ASCII and
    JSON escapes included, and a newer answer replaces the older one of its condition."""
    from ratepay_oms.engine.persist import Origin, StateWriter, _detail
    from ratepay_oms.engine.verdict import Verdict

    _, ids = place(engine, ("A", 1), ("B", 1), fire=False)
    reads: list[dict[str, Any]] = [
        {"m": 'Grüße \u2028 "q" \\ nul\x00 😀', "n": None}, {}, {"d": 1.5, "l": [1, "x"]},
    ]
    at = datetime(2025, 6, 2, 12, 0, 0, 123456)

    def write(process: str, results: list[tuple[int, str, bool, dict[str, Any]]]) -> None:
        with engine.session() as s, s.begin():
            items = {i.id: i for i in s.scalars(select(OrderItem).where(OrderItem.id.in_(ids)))}
            writer = StateWriter(s, at, Origin.current())
            for item_id, name, holds, read in results:
                writer.record_conditions(
                    items[item_id], process, "stäte", None, [(name, Verdict(holds, read))]
                )
            writer.flush_log()

    first, second = ids
    write("Pröc", [(first, "Cond/ä", False, reads[2]), (second, "Cond/ä", True, reads[1]),
                   (first, "Other", True, reads[2])])
    write("Pröc 2", [(first, "Cond/ä", True, reads[0])])  # replaces the first answer
    with engine.session() as s:
        rows = s.execute(
            select(ConditionResult.item_id, ConditionResult.process, ConditionResult.state,
                   ConditionResult.event, ConditionResult.condition, ConditionResult.result,
                   ConditionResult.detail, ConditionResult.evaluated_at)
            .where(ConditionResult.item_id.in_(ids))
            .order_by(ConditionResult.item_id, ConditionResult.condition)
        ).all()
    assert [tuple(r) for r in rows] == [
        (first, "Pröc 2", "stäte", None, "Cond/ä", True, _detail(Verdict(True, reads[0])), at),
        (first, "Pröc", "stäte", None, "Other", True, _detail(Verdict(True, reads[2])), at),
        (second, "Pröc", "stäte", None, "Cond/ä", True, None, at),
    ]
    assert json.loads(rows[0].detail) == reads[0]
