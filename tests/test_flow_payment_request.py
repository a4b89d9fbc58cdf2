"""Authorisation outcomes: a decline (RatePAY's message kept for the shop), a technical
refusal with its manual retry (a fresh PAYMENT_INIT), and a transport failure the engine
retries by itself with backoff."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from ratepay_oms.demo import calls_of, demo_engine, example_order
from ratepay_oms.persistence.models import Order
from ratepay_oms.persistence.payment import RatepayItemOutcome, RatepayPayment
from ratepay_oms.sandbox.faults import Fault


@pytest.fixture
def engine(sandbox, tmp_sqlite_url):
    eng = demo_engine(tmp_sqlite_url, sandbox.settings)
    yield eng
    eng.close()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _payment(engine, ref):
    with engine.session() as s:
        return s.scalar(
            select(RatepayPayment).join(Order, Order.id == RatepayPayment.order_id)
            .where(Order.order_ref == ref)
        )


def _calls(sandbox):
    return [(c.operation, c.result) for c in calls_of(sandbox.gateway.received)]


def test_decline_keeps_ratepays_message_and_stops(engine, sandbox):
    ref = f"DECLINE-{uuid.uuid4().hex[:6]}"
    view = engine.place_order(example_order(ref, last_name="Ablehnung"))
    assert {i.state for i in view.items} == {"payment request declined"}
    assert _calls(sandbox) == [("PAYMENT_INIT", "350"), ("PAYMENT_REQUEST", "401")]
    payment = _payment(engine, ref)
    assert payment.result_code == "401"
    assert payment.customer_message  # what the shop shows the shopper
    assert engine.order(ref).items[0].state == "payment request declined"
    # a decline is final: no manual event leads out (a retry would be declined again)
    assert engine.definitions()["RatepayInvoice01"].is_final("payment request declined")


def test_payment_request_error_then_manual_retry_with_a_fresh_transaction(engine, sandbox):
    sandbox.gateway.faults.add(Fault("result_code", operation="PAYMENT_REQUEST", times=1))
    ref = f"PRERR-{uuid.uuid4().hex[:6]}"
    view = engine.place_order(example_order(ref))
    assert {i.state for i in view.items} == {"payment request invalid"}
    with engine.session() as s:
        outcomes = s.scalars(select(RatepayItemOutcome).where(
            RatepayItemOutcome.item_id.in_([i.id for i in view.items]))).all()
        assert [(o.action, o.success, o.result_code) for o in outcomes] == [
            ("payment_request", False, "150")
        ] * 4
    first_tid = _payment(engine, ref).transaction_id

    result = engine.trigger("retry payment request", ref)
    assert not result.errors
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    assert _calls(sandbox) == [
        ("PAYMENT_INIT", "350"),
        ("PAYMENT_REQUEST", "150"),
        ("PAYMENT_INIT", "350"),
        ("PAYMENT_REQUEST", "402"),
        ("PAYMENT_CONFIRM", "400"),
    ]
    second_tid = _payment(engine, ref).transaction_id
    assert second_tid != first_tid
    assert sandbox.gateway.transactions[second_tid].order_id == ref
    history = [(h.from_state, h.to_state, h.event) for h in engine.history(ref)
               if h.item_id == view.items[0].id]
    assert ("payment request invalid", "payment confirmation initialized",
            "retry payment request") in history


def test_payment_request_http_500_is_reconciled_then_sent_again_by_the_tick(engine, sandbox):
    """A 500 may hide a booking: the request is not re-sent before the status lookup says the
    transaction was never requested; then the tick sends it again with a fresh INIT."""
    sandbox.gateway.faults.add(Fault("http_500", operation="PAYMENT_REQUEST", times=1))
    ref = f"PR500-{uuid.uuid4().hex[:6]}"
    now = _now()
    view = engine.place_order(example_order(ref), now=now)
    assert {i.state for i in view.items} == {"payment request initialized"}
    item = engine.order(ref).items[0]
    assert item.intent_id is not None and item.retry_at is None and "500" in item.last_error
    (intent,) = engine.intents(ref)
    assert intent.status == "pending" and intent.summary["operation"] == "PAYMENT_REQUEST"
    assert "HTTP status 500" in intent.last_error
    assert "may have been booked" in item.last_error

    engine.tick(now=now + timedelta(seconds=5))
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    assert _calls(sandbox) == [
        ("PAYMENT_INIT", "350"), ("PAYMENT_REQUEST", "HTTP 500"), ("PAYMENT_INIT", "350"),
        ("PAYMENT_REQUEST", "402"), ("PAYMENT_CONFIRM", "400"),
    ]
    (settled,) = engine.intents(ref, open_only=False)[:1]
    assert settled.status == "settled" and settled.resolution == "reconciled_not_booked"
    assert engine.intents(ref) == []
    assert engine.order(ref).items[0].retry_at is None
