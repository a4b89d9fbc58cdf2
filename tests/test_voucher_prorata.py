"""The ``prorata`` voucher rule on its own (no database, no HTTP): the split over the units,
and every delivery, cancellation and return carrying the shares of its units."""

from __future__ import annotations

from decimal import Decimal as D

from hypothesis import given, settings
from hypothesis import strategies as st

from ratepay_oms.demo import example_order
from ratepay_oms.orders import parse_order
from ratepay_oms.plugins.ratepay.basket import (
    PRORATA,
    OrderLedger,
    Unit,
    cancellation_basket,
    delivery_basket,
    return_basket,
    voucher_shares,
)

ORDER = parse_order(example_order("V-1"))  # 3 mugs à 12.50, tea pot 45.00 net, voucher −5.00
UNITS = [Unit(1, 0, "SKU-100", "Mug", D("12.50"), D("19")),
         Unit(2, 0, "SKU-100", "Mug", D("12.50"), D("19")),
         Unit(3, 0, "SKU-100", "Mug", D("12.50"), D("19")),
         Unit(4, 1, "SKU-200", "Tea pot", D("49.90"), D("19"), D("-4.90"))]
SHARES = voucher_shares(D("-5.00"), UNITS)


def _ledger(**kw) -> OrderLedger:
    return OrderLedger(all_items={1, 2, 3, 4}, voucher_rule=PRORATA, voucher_shares=SHARES, **kw)


def test_the_voucher_is_split_by_value_and_adds_up_exactly():
    # goods 82.50: a mug is 12.50/82.50 of it (−0.7575…), the tea pot 45/82.50 (−2.7272…);
    # cut to −0.75 / −2.72, the 3 cents left go to the largest remainders (the mugs)
    assert {1: D("-0.76"), 2: D("-0.76"), 3: D("-0.76"), 4: D("-2.72")} == SHARES
    assert sum(SHARES.values()) == D("-5.00")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=100_000), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=100_000),
)
def test_shares_always_add_up_and_never_exceed_a_units_value(cents, voucher_cents):
    units = [Unit(i, 0, "S", "x", D(c) / 100, D("19")) for i, c in enumerate(cents)]
    goods = sum(u.unit_price_gross for u in units)
    voucher = -min(D(voucher_cents) / 100, goods)
    shares = voucher_shares(voucher, units)
    assert sum(shares.values()) == voucher
    for unit in units:
        assert -unit.unit_price_gross <= shares[unit.item_id] <= 0


def test_each_delivery_carries_the_shares_of_its_units():
    first = delivery_basket(ORDER, _ledger(), UNITS[:2])
    assert (first.discount.unit_price_gross, first.discount_before) == (D("-1.52"), D("0"))
    assert first.amount == D("25.00") + D("4.95") - D("1.52")
    rest = delivery_basket(ORDER, _ledger(delivered={1, 2}), UNITS[2:])
    assert (rest.discount.unit_price_gross, rest.discount_before) == (D("-3.48"), D("-1.52"))
    assert first.discount.unit_price_gross + rest.discount.unit_price_gross == D("-5.00")


def test_a_cancellation_after_a_delivery_keeps_the_delivered_share():
    """Under last_delivery the cancelled rest takes the whole voucher and the shopper pays
    full price for what was shipped; pro rata the shipped mug keeps its share."""
    delivered = delivery_basket(ORDER, _ledger(), UNITS[:1])
    cancelled = cancellation_basket(ORDER, _ledger(delivered={1}), UNITS[1:])
    assert delivered.discount.unit_price_gross == D("-0.76")
    assert cancelled.discount.unit_price_gross == D("-4.24")
    assert cancelled.amount == D("25.00") + D("45.00") - D("4.24")


def test_a_return_takes_back_exactly_the_share_delivered_with_the_unit():
    returned = return_basket(ORDER, _ledger(delivered={1, 2, 3, 4}), UNITS[3:])
    assert (returned.discount.unit_price_gross, returned.discount_before) == (
        D("-2.72"), D("0"))
    assert returned.amount == D("45.00") - D("2.72")


def test_the_default_rule_is_unchanged():
    ledger = OrderLedger(all_items={1, 2, 3, 4}, voucher_shares=SHARES)
    assert delivery_basket(ORDER, ledger, UNITS[:2]).discount is None
    assert delivery_basket(ORDER, ledger, UNITS).discount.unit_price_gross == D("-5.00")
