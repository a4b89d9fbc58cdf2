"""Payment flow per method over real HTTP to the sandbox, on every dialect: authorisation,
confirmation, delivery, the 90-day completion; prepayment's wait for the money and its
cancellation when the money never comes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import pytest
from sqlalchemy import select

from ratepay_oms.demo import calls_of, demo_engine, example_order, sent_basket
from ratepay_oms.persistence.models import Order
from ratepay_oms.persistence.payment import RatepayPayment

HAPPY_HISTORY = [
    (None, "new"),
    ("new", "payment request initialized"),
    ("payment request initialized", "payment confirmation initialized"),
    ("payment confirmation initialized", "payment confirmed"),
    ("payment confirmed", "ready for shipment"),
    ("ready for shipment", "shipped"),
    ("shipped", "ready for refund"),
    ("ready for refund", "completed"),
]


@pytest.fixture
def engine(sandbox, server_db_url):
    eng = demo_engine(server_db_url, sandbox.settings)
    yield eng
    eng.close()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@pytest.mark.parametrize("method", ["INVOICE", "ELV", "PREPAYMENT", "INSTALLMENT"])
def test_payment_flow(engine, sandbox, method):
    ref = f"PAY-{method}-{uuid.uuid4().hex[:6]}"
    now = _now()
    view = engine.place_order(example_order(ref, method), now=now)
    ids = [i.id for i in view.items]
    if method == "PREPAYMENT":
        assert {i.state for i in view.items} == {"payment confirmation initialized"}
        engine.trigger("create payment confirmation", ref, now=now)  # the money arrived
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}

    engine.trigger("ship", ref, now=now)
    assert {i.state for i in engine.order(ref).items} == {"ready for refund"}
    engine.tick(now=now + timedelta(days=91))
    assert {i.state for i in engine.order(ref).items} == {"completed"}

    calls = calls_of(sandbox.gateway.received)
    expected = ["PAYMENT_INIT", "PAYMENT_REQUEST", "PAYMENT_CONFIRM", "CONFIRMATION_DELIVER"]
    if method == "INSTALLMENT":
        expected = ["CALCULATION_REQUEST", *expected]
    assert [c.operation for c in calls] == expected
    assert all(c.result in ("350", "402", "400", "404", "502") for c in calls)

    pr = next(ex for ex in sandbox.gateway.received if ex.operation == "PAYMENT_REQUEST")
    text = pr.request_xml.decode()
    assert f'method="{method}"' in text
    assert ("<bank-account>" in text) == (method == "ELV")
    assert ("<installment-details>" in text) == (method == "INSTALLMENT")
    goods = D("331.45") if method == "INSTALLMENT" else D("82.45")
    basket = sent_basket(pr.request_xml)
    assert basket["amount"] == goods
    assert basket["shipping"] == D("4.95") and basket["discount"] == D("-5.00")
    cd = next(ex for ex in sandbox.gateway.received if ex.operation == "CONFIRMATION_DELIVER")
    assert sent_basket(cd.request_xml) == basket  # one parcel: everything at once

    tid = next(iter(sandbox.gateway.transactions))
    ledger = sandbox.gateway.ledger(tid)
    assert all(p.open == 0 and p.delivered == p.ordered for p in ledger.values())
    assert sandbox.gateway.transactions[tid].invoiced == goods

    with engine.session() as s:
        payment = s.scalar(
            select(RatepayPayment).join(Order, Order.id == RatepayPayment.order_id)
            .where(Order.order_ref == ref)
        )
        assert payment is not None and payment.method == method
        assert payment.transaction_id == tid
        assert payment.descriptor and payment.result_code == "402"
        assert (payment.installment_plan is not None) == (method == "INSTALLMENT")
        assert (payment.shipping_status, payment.discount_status) == ("delivered", "delivered")

    history = [(h.from_state, h.to_state) for h in engine.history(ref) if h.item_id == ids[0]]
    assert history == HAPPY_HISTORY


def test_prepayment_not_paid_within_14_days_is_cancelled_at_ratepay(engine, sandbox):
    ref = f"PREPAY-UNPAID-{uuid.uuid4().hex[:6]}"
    now = _now()
    engine.place_order(example_order(ref, "PREPAYMENT"), now=now)
    engine.tick(now=now + timedelta(days=13))
    assert {i.state for i in engine.order(ref).items} == {"payment confirmation initialized"}

    engine.tick(now=now + timedelta(days=15))
    assert {i.state for i in engine.order(ref).items} == {"cancelled"}
    change = sandbox.gateway.received[-1]
    assert (change.operation, change.subtype) == ("PAYMENT_CHANGE", "cancellation")
    assert sent_basket(change.request_xml)["amount"] == D("82.45")
    tid = next(iter(sandbox.gateway.transactions))
    assert all(p.cancelled == p.ordered for p in sandbox.gateway.ledger(tid).values())
