"""The reference's worked example (order 100045, §8) replayed through the engine, on every
dialect: ship 2 mugs (with shipping), cancel 1 mug, ship the tea pot (with the voucher),
return 1 mug. The gateway's ledger must match the reference's table step by step."""

from __future__ import annotations

import uuid
from decimal import Decimal as D

import pytest

from ratepay_oms.demo import demo_engine, example_order, sent_basket


@pytest.fixture
def engine(sandbox, server_db_url):
    eng = demo_engine(server_db_url, sandbox.settings)
    yield eng
    eng.close()


def _ledger(sandbox, tid):
    ledger = sandbox.gateway.ledger(tid)
    return {
        key: (p.open, p.delivered, p.cancelled, p.returned) for key, p in ledger.items()
    }


def test_worked_example_100045_gives_the_reference_ledger(engine, sandbox):
    ref = f"100045-{uuid.uuid4().hex[:6]}"
    view = engine.place_order(example_order(ref))
    ids = [i.id for i in view.items]
    mugs, pot = ids[:3], ids[3]
    tid = next(iter(sandbox.gateway.transactions))
    assert _ledger(sandbox, tid) == {
        "SKU-100": (3, 0, 0, 0),
        "SKU-200": (1, 0, 0, 0),
        "shipping": (D("4.95"), 0, 0, 0),
        "discount": (D("-5.00"), 0, 0, 0),
    }

    engine.trigger("ship", ref, mugs[:2])  # CD #1: 2 × SKU-100 + shipping = 29.95
    assert _ledger(sandbox, tid)["SKU-100"] == (1, 2, 0, 0)
    assert _ledger(sandbox, tid)["shipping"] == (0, D("4.95"), 0, 0)

    engine.trigger("cancel", ref, mugs[2:])  # PC cancellation: 1 × SKU-100 = 12.50
    assert _ledger(sandbox, tid)["SKU-100"] == (0, 2, 1, 0)

    engine.trigger("ship", ref, [pot])  # CD #2: tea pot + voucher = 40.00
    assert _ledger(sandbox, tid)["SKU-200"] == (0, 1, 0, 0)
    assert _ledger(sandbox, tid)["discount"] == (0, D("-5.00"), 0, 0)

    engine.trigger("refund payment", ref, mugs[:1])  # PC return: 1 × SKU-100 = 12.50
    assert _ledger(sandbox, tid) == {
        "SKU-100": (0, 2, 1, 1),
        "SKU-200": (0, 1, 0, 0),
        "shipping": (0, D("4.95"), 0, 0),
        "discount": (0, D("-5.00"), 0, 0),
    }
    assert sandbox.gateway.transactions[tid].invoiced == D("57.45")

    follow_ups = [
        (ex.operation, ex.subtype, sent_basket(ex.request_xml))
        for ex in sandbox.gateway.received
        if ex.operation in ("CONFIRMATION_DELIVER", "PAYMENT_CHANGE")
    ]
    assert follow_ups == [
        ("CONFIRMATION_DELIVER", None, {"amount": D("29.95"), "shipping": D("4.95"),
         "discount": None, "items": [("SKU-100", 2, D("12.50"), D("0"))]}),
        ("PAYMENT_CHANGE", "cancellation", {"amount": D("12.50"), "shipping": None,
         "discount": None, "items": [("SKU-100", 1, D("12.50"), D("0"))]}),
        ("CONFIRMATION_DELIVER", None, {"amount": D("40.00"), "shipping": None,
         "discount": D("-5.00"), "items": [("SKU-200", 1, D("49.90"), D("-4.90"))]}),
        ("PAYMENT_CHANGE", "return", {"amount": D("12.50"), "shipping": None,
         "discount": None, "items": [("SKU-100", 1, D("12.50"), D("0"))]}),
    ]
    states = {i.id: i.state for i in engine.order(ref).items}
    assert states == {
        mugs[0]: "completed",
        mugs[1]: "ready for refund",
        mugs[2]: "cancelled",
        pot: "ready for refund",
    }
