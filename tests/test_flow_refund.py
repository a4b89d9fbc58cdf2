"""Refund flows: everything back, part back, item by item (shipping and voucher go back with
the last unit), and the Spryker bug: a failed partial refund after a successful one must not
pass."""

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


def _shipped(engine, method="INVOICE"):
    ref = f"R-{uuid.uuid4().hex[:8]}"
    ids = [i.id for i in engine.place_order(example_order(ref, method)).items]
    engine.trigger("ship", ref)
    return ref, ids


def _states(engine, ref):
    return [i.state for i in engine.order(ref).items]


def _returns(sandbox):
    return [sent_basket(ex.request_xml) for ex in sandbox.gateway.received
            if ex.operation == "PAYMENT_CHANGE" and ex.subtype == "return"]


def _tx(sandbox):
    tid = next(iter(sandbox.gateway.transactions))
    return sandbox.gateway.ledger(tid), sandbox.gateway.transactions[tid]


def test_refund_of_the_whole_order(engine, sandbox):
    ref, ids = _shipped(engine, "ELV")
    engine.trigger("refund payment", ref)
    assert _states(engine, ref) == ["completed"] * 4
    assert _returns(sandbox) == [{
        "amount": D("82.45"), "shipping": D("4.95"), "discount": D("-5.00"),
        "items": [("SKU-100", 3, D("12.50"), D("0")), ("SKU-200", 1, D("49.90"), D("-4.90"))],
    }]
    ledger, tx = _tx(sandbox)
    assert all(p.returned == p.delivered == p.ordered for p in ledger.values())
    assert tx.invoiced == D("0.00")
    history = [(h.from_state, h.to_state, h.event) for h in engine.history(ref)
               if h.item_id == ids[3]][-2:]
    assert history == [("ready for refund", "refund succeeded", "refund payment"),
                       ("refund succeeded", "completed", "complete refund")]


def test_partial_refund(engine, sandbox):
    ref, ids = _shipped(engine)
    engine.trigger("refund payment", ref, ids[3:])
    assert _states(engine, ref) == ["ready for refund"] * 3 + ["completed"]
    assert _returns(sandbox) == [{"amount": D("45.00"), "shipping": None, "discount": None,
                                  "items": [("SKU-200", 1, D("49.90"), D("-4.90"))]}]
    ledger, tx = _tx(sandbox)
    assert (ledger["SKU-200"].returned, ledger["SKU-100"].returned) == (1, 0)
    assert tx.invoiced == D("37.45")


def test_refunds_item_by_item_add_up_and_the_last_takes_shipping_and_voucher(engine, sandbox):
    ref, ids = _shipped(engine)
    for item_id in ids:
        engine.trigger("refund payment", ref, [item_id])
    assert _states(engine, ref) == ["completed"] * 4
    assert [r["amount"] for r in _returns(sandbox)] == [
        D("12.50"), D("12.50"), D("12.50"), D("44.95")
    ]
    assert (_returns(sandbox)[-1]["shipping"], _returns(sandbox)[-1]["discount"]) == (
        D("4.95"), D("-5.00"))
    assert _tx(sandbox)[1].invoiced == D("0.00")


def test_failed_partial_refund_after_a_successful_one_does_not_pass(engine, sandbox):
    """Spryker's conditions read one order-level result code (403 after the first refund), so
    its second, failed refund would pass. Ours read the item's own outcome."""
    ref, ids = _shipped(engine)
    engine.trigger("refund payment", ref, ids[:1])
    assert _states(engine, ref)[0] == "completed"

    sandbox.gateway.faults.add(
        Fault("result_code", operation="PAYMENT_CHANGE", subtype="return", times=1,
              reason_code=2300)
    )
    engine.trigger("refund payment", ref, ids[1:2])
    assert _states(engine, ref) == ["completed", "refund invalid", "ready for refund",
                                    "ready for refund"]
    ledger, _ = _tx(sandbox)
    assert ledger["SKU-100"].returned == 1

    engine.trigger("retry refund", ref, ids[1:2])
    assert _states(engine, ref) == ["completed", "completed", "ready for refund",
                                    "ready for refund"]
    assert [(c.subtype, c.amount, c.result) for c in calls_of(sandbox.gateway.received)[-3:]] \
        == [("return", "12.50", "403"), ("return", "12.50", "150"), ("return", "12.50", "403")]
    ledger, tx = _tx(sandbox)
    assert ledger["SKU-100"].returned == 2
    assert tx.invoiced == D("57.45")
