"""The shipping / voucher rules of ``basket.py`` on their own (no database, no HTTP)."""

from __future__ import annotations

from decimal import Decimal as D

from ratepay_oms.demo import example_order
from ratepay_oms.orders import parse_order
from ratepay_oms.persistence.payment import CANCELLED, DELIVERED
from ratepay_oms.plugins.ratepay.basket import (
    OrderLedger,
    Unit,
    cancellation_basket,
    delivery_basket,
    full_basket,
    return_basket,
    settle_specials,
)

ORDER = parse_order(example_order("B-1"))
UNITS = [Unit(1, 0, "SKU-100", "Mug", D("12.50"), D("19")),
         Unit(2, 0, "SKU-100", "Mug", D("12.50"), D("19")),
         Unit(3, 0, "SKU-100", "Mug", D("12.50"), D("19")),
         Unit(4, 1, "SKU-200", "Tea pot", D("49.90"), D("19"), D("-4.90"))]


def _ledger(**kw) -> OrderLedger:
    return OrderLedger(all_items={1, 2, 3, 4}, **kw)


def test_full_basket_is_the_order():
    plan = full_basket(ORDER, UNITS)
    assert plan.amount == ORDER.basket_amount == D("82.45")
    assert [(line.article_number, line.quantity) for line in plan.lines] == [
        ("SKU-100", 3), ("SKU-200", 1)]


def test_cancelled_first_then_the_last_delivery_takes_the_voucher():
    plan = cancellation_basket(ORDER, _ledger(), UNITS[:3])
    assert (plan.shipping, plan.discount, plan.amount) == (None, None, D("37.50"))
    plan = delivery_basket(ORDER, _ledger(cancelled={1, 2, 3}), UNITS[3:])
    assert plan.amount == D("44.95") and plan.shipping and plan.discount


def test_a_voucher_larger_than_the_last_cancelled_unit_stays_open():
    order = parse_order({**example_order("B-2"),
                         "discount": {"name": "Big voucher", "unit_price_gross": "-20.00",
                                      "tax_rate": "19"}})
    ledger = _ledger(delivered={4}, shipping_status=DELIVERED)
    plan = cancellation_basket(order, ledger, [UNITS[0]])
    assert plan.discount is None  # three mugs still open: not the last one anyway
    ledger = _ledger(delivered={4}, cancelled={2, 3}, shipping_status=DELIVERED)
    plan = cancellation_basket(order, ledger, [UNITS[0]])
    assert plan.discount is None and plan.amount == D("12.50")  # 12.50 − 20.00 would be < 0
    assert settle_specials(ledger, plan, CANCELLED) == (DELIVERED, "open")


def test_shipping_is_not_returned_while_items_are_open():
    ledger = _ledger(delivered={1}, shipping_status=DELIVERED)
    plan = return_basket(ORDER, ledger, UNITS[:1])
    assert plan.shipping is None and plan.amount == D("12.50")


def test_zero_shipping_is_never_sent():
    order = parse_order({**example_order("B-3"),
                         "shipping": {"name": "Free", "unit_price_gross": "0.00",
                                      "tax_rate": "19"}})
    assert delivery_basket(order, _ledger(), UNITS[:1]).shipping is None
