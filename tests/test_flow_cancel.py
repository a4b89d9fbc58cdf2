"""Cancellation flows: everything, part of the order, the rest after a partial delivery (the
voucher goes with the last open item), and a refused cancellation with its retry."""

from __future__ import annotations

import uuid
from decimal import Decimal as D

import pytest

from ratepay_oms.demo import calls_of, demo_engine, example_order, sent_basket
from ratepay_oms.sandbox.faults import Fault


@pytest.fixture
def engine(sandbox, tmp_sqlite_url):
    eng = demo_engine(tmp_sqlite_url, sandbox.settings)
    yield eng
    eng.close()


def _place(engine, method="INVOICE"):
    ref = f"C-{uuid.uuid4().hex[:8]}"
    ids = [i.id for i in engine.place_order(example_order(ref, method)).items]
    return ref, ids


def _states(engine, ref):
    return [i.state for i in engine.order(ref).items]


def _follow_ups(sandbox):
    return [
        (ex.operation, ex.subtype, sent_basket(ex.request_xml))
        for ex in sandbox.gateway.received
        if ex.operation in ("CONFIRMATION_DELIVER", "PAYMENT_CHANGE")
    ]


def _ledger(sandbox):
    tid = next(iter(sandbox.gateway.transactions))
    return {k: (p.open, p.delivered, p.cancelled, p.returned)
            for k, p in sandbox.gateway.ledger(tid).items()}, sandbox.gateway.transactions[tid]


def test_cancellation_of_the_whole_order(engine, sandbox):
    ref, ids = _place(engine, "ELV")
    engine.trigger("cancel", ref)
    assert _states(engine, ref) == ["cancelled"] * 4
    assert _follow_ups(sandbox) == [
        ("PAYMENT_CHANGE", "cancellation", {
            "amount": D("82.45"), "shipping": D("4.95"), "discount": D("-5.00"),
            "items": [("SKU-100", 3, D("12.50"), D("0")), ("SKU-200", 1, D("49.90"), D("-4.90"))],
        })
    ]
    ledger, tx = _ledger(sandbox)
    assert ledger == {"SKU-100": (0, 0, 3, 0), "SKU-200": (0, 0, 1, 0),
                      "shipping": (0, 0, D("4.95"), 0), "discount": (0, 0, D("-5.00"), 0)}
    assert tx.invoiced == D("0.00")
    history = [(h.from_state, h.to_state, h.event) for h in engine.history(ref)
               if h.item_id == ids[0]][-2:]
    assert history == [("ready for shipment", "ready for cancel", "cancel"),
                       ("ready for cancel", "cancelled", "process cancellation")]


def test_partial_cancellation_then_the_rest_ships(engine, sandbox):
    ref, ids = _place(engine)
    engine.trigger("cancel", ref, ids[:2])
    assert _states(engine, ref) == ["cancelled", "cancelled", "ready for shipment",
                                    "ready for shipment"]
    engine.trigger("ship", ref)
    assert _states(engine, ref) == ["cancelled", "cancelled", "ready for refund",
                                    "ready for refund"]
    assert _follow_ups(sandbox) == [
        ("PAYMENT_CHANGE", "cancellation", {"amount": D("25.00"), "shipping": None,
         "discount": None, "items": [("SKU-100", 2, D("12.50"), D("0"))]}),
        ("CONFIRMATION_DELIVER", None, {
            "amount": D("57.45"), "shipping": D("4.95"), "discount": D("-5.00"),
            "items": [("SKU-100", 1, D("12.50"), D("0")), ("SKU-200", 1, D("49.90"), D("-4.90"))],
        }),
    ]
    ledger, tx = _ledger(sandbox)
    assert ledger["SKU-100"] == (0, 1, 2, 0)
    assert tx.invoiced == D("57.45")


def test_rest_cancelled_after_a_partial_delivery_takes_the_voucher_along(engine, sandbox):
    ref, ids = _place(engine)
    engine.trigger("ship", ref, ids[3:])  # tea pot + shipping
    engine.trigger("cancel", ref, ids[:3])  # the three mugs: the last open items
    assert _states(engine, ref) == ["cancelled"] * 3 + ["ready for refund"]
    assert _follow_ups(sandbox)[1] == (
        "PAYMENT_CHANGE", "cancellation", {"amount": D("32.50"), "shipping": None,
        "discount": D("-5.00"), "items": [("SKU-100", 3, D("12.50"), D("0"))]})
    ledger, tx = _ledger(sandbox)
    assert ledger["discount"] == (0, 0, D("-5.00"), 0)
    assert ledger["shipping"] == (0, D("4.95"), 0, 0)
    assert tx.invoiced == D("49.95")  # tea pot 45.00 + shipping 4.95: what the customer owes


def test_refused_cancellation_goes_to_cancel_invalid_and_can_be_retried(engine, sandbox):
    ref, ids = _place(engine)
    sandbox.gateway.faults.add(
        Fault("result_code", operation="PAYMENT_CHANGE", subtype="cancellation", times=1,
              reason_code=2300)
    )
    engine.trigger("cancel", ref, ids[:1])
    assert _states(engine, ref)[0] == "cancel invalid"
    engine.trigger("retry cancellation", ref, ids[:1])
    assert _states(engine, ref) == ["cancelled"] + ["ready for shipment"] * 3
    calls = calls_of(sandbox.gateway.received)[-2:]
    assert [(c.subtype, c.amount, c.result) for c in calls] == [
        ("cancellation", "12.50", "150"), ("cancellation", "12.50", "403")
    ]
    assert _ledger(sandbox)[0]["SKU-100"] == (2, 0, 1, 0)
