"""Shipment flows: a partial shipment in two parcels, a refused delivery confirmation with its
manual retry, and a gateway that answers HTTP 500 (the engine retries with backoff)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import pytest

from ratepay_oms.demo import calls_of, demo_engine, example_order, sent_basket
from ratepay_oms.sandbox.faults import Fault


@pytest.fixture
def engine(sandbox, tmp_sqlite_url):
    eng = demo_engine(tmp_sqlite_url, sandbox.settings)
    yield eng
    eng.close()


def _place(engine, method="INVOICE", now=None):
    ref = f"S-{uuid.uuid4().hex[:8]}"
    ids = [i.id for i in engine.place_order(example_order(ref, method), now=now).items]
    return ref, ids


def _states(engine, ref):
    return [i.state for i in engine.order(ref).items]


def _deliveries(sandbox):
    return [sent_basket(ex.request_xml) for ex in sandbox.gateway.received
            if ex.operation == "CONFIRMATION_DELIVER"]


def _tx(sandbox):
    tid = next(iter(sandbox.gateway.transactions))
    return sandbox.gateway.ledger(tid), sandbox.gateway.transactions[tid]


def test_partial_shipment_in_two_parcels(engine, sandbox):
    ref, ids = _place(engine, "ELV")
    engine.trigger("ship", ref, ids[:2])
    assert _states(engine, ref) == ["ready for refund"] * 2 + ["ready for shipment"] * 2
    ledger, tx = _tx(sandbox)
    assert (ledger["SKU-100"].open, ledger["SKU-100"].delivered) == (1, 2)
    assert tx.invoiced == D("29.95")

    engine.trigger("ship", ref, ids[2:])
    assert _states(engine, ref) == ["ready for refund"] * 4
    assert _deliveries(sandbox) == [
        {"amount": D("29.95"), "shipping": D("4.95"), "discount": None,
         "items": [("SKU-100", 2, D("12.50"), D("0"))]},
        {"amount": D("52.50"), "shipping": None, "discount": D("-5.00"),
         "items": [("SKU-100", 1, D("12.50"), D("0")), ("SKU-200", 1, D("49.90"), D("-4.90"))]},
    ]
    ledger, tx = _tx(sandbox)
    assert all(p.open == 0 for p in ledger.values())
    assert tx.invoiced == D("82.45")


def test_refused_delivery_goes_to_delivery_invalid_and_the_retry_sends_it_again(engine, sandbox):
    ref, ids = _place(engine)
    sandbox.gateway.faults.add(
        Fault("result_code", operation="CONFIRMATION_DELIVER", times=1, reason_code=2300)
    )
    engine.trigger("ship", ref, ids[:1])
    assert _states(engine, ref) == ["delivery invalid"] + ["ready for shipment"] * 3
    assert _tx(sandbox)[0]["SKU-100"].delivered == 0

    engine.trigger("retry delivery confirmation", ref, ids[:1])
    assert _states(engine, ref) == ["ready for refund"] + ["ready for shipment"] * 3
    first, second = _deliveries(sandbox)
    assert first == second == {"amount": D("17.45"), "shipping": D("4.95"), "discount": None,
                               "items": [("SKU-100", 1, D("12.50"), D("0"))]}
    assert [c.result for c in calls_of(sandbox.gateway.received)[-2:]] == ["150", "404"]
    history = [(h.from_state, h.to_state, h.event) for h in engine.history(ref)
               if h.item_id == ids[0]][-3:]
    assert history == [
        ("ready for shipment", "shipped", "ship"),
        ("shipped", "delivery invalid", "create delivery confirmation"),
        ("delivery invalid", "ready for refund", "retry delivery confirmation"),
    ]


def test_delivery_http_500_keeps_the_items_shipped_until_the_tick_retries(engine, sandbox):
    """An HTTP 500 may hide a booking: the delivery waits on its intent until the status lookup
    shows nothing was booked, and only then goes out again."""
    now = datetime.now(UTC).replace(tzinfo=None)
    ref, _ids = _place(engine, now=now)
    sandbox.gateway.faults.add(Fault("http_500", operation="CONFIRMATION_DELIVER", times=1))
    result = engine.trigger("ship", ref, now=now)
    assert result.errors
    assert _states(engine, ref) == ["shipped"] * 4
    item = engine.order(ref).items[0]
    assert item.intent_id is not None and item.retry_at is None
    assert _tx(sandbox)[0]["SKU-100"].delivered == 0

    engine.tick(now=now + timedelta(minutes=5))
    assert _states(engine, ref) == ["ready for refund"] * 4
    assert [c.result for c in calls_of(sandbox.gateway.received)[-2:]] == ["HTTP 500", "404"]
    assert _tx(sandbox)[1].invoiced == D("82.45")
