"""The sandbox ledger without HTTP: RatePAY's accounting rules (reference §5.1, §8)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest

from ratepay_oms.sandbox import ledger
from ratepay_oms.sandbox.ledger import BasketLine, LedgerRefusal, Transaction

NOW = datetime(2024, 1, 16, 9, 30)
D = Decimal


def item(article: str, qty: int, price: str, discount: str = "0.00") -> BasketLine:
    return BasketLine("item", D(price), D("19"), article, "", qty, D(discount))


def shipping(amount: str) -> BasketLine:
    return BasketLine(ledger.SHIPPING, D(amount), D("19"))


def voucher(amount: str) -> BasketLine:
    return BasketLine(ledger.DISCOUNT, D(amount), D("19"))


def order_100045() -> Transaction:
    tx = Transaction("31-202401151000042", "K7QP.2M9X.T4ZA.8LWC", "P", NOW)
    tx.state = ledger.REQUESTED
    ledger.authorise(
        tx,
        [
            item("SKU-100", 3, "12.50"),
            item("SKU-200", 1, "49.90", "-4.90"),
            shipping("4.95"),
            voucher("-5.00"),
        ],
    )
    return tx


def counts(tx: Transaction, key: str) -> tuple[object, object, object, object]:
    p = tx.positions[key]
    return (p.open, p.delivered, p.cancelled, p.returned)


def test_basket_sum_follows_the_protocol_formula() -> None:
    # RatePAY's 1.8 example: 6×10 + 1×100 + 2×(50−10) − 15 + 5 = 230.00
    lines = [
        item("A", 6, "10"),
        item("B", 1, "100"),
        item("C", 2, "50", "-10"),
        voucher("-15"),
        shipping("5"),
    ]
    assert ledger.basket_sum(lines) == D("230.00")


def test_worked_example_order_100045_ends_with_the_reference_table() -> None:
    tx = order_100045()
    assert tx.amount == D("82.45")
    b1 = ledger.deliver(tx, [item("SKU-100", 2, "12.50"), shipping("4.95")], NOW)
    assert b1.amount == D("29.95") and tx.invoiced == D("29.95")
    assert counts(tx, "SKU-100") == (1, 2, 0, 0)
    ledger.cancel(tx, [item("SKU-100", 1, "12.50")], NOW)
    assert counts(tx, "SKU-100") == (0, 2, 1, 0) and tx.invoiced == D("29.95")
    b3 = ledger.deliver(tx, [item("SKU-200", 1, "49.90", "-4.90"), voucher("-5.00")], NOW)
    assert b3.amount == D("40.00") and tx.invoiced == D("69.95")
    ledger.return_goods(tx, [item("SKU-100", 1, "12.50")], NOW)
    assert tx.invoiced == D("57.45")
    ledger.credit(tx, [voucher("-7.50")], NOW)
    assert tx.invoiced == D("49.95")
    assert counts(tx, "SKU-100") == (0, 2, 1, 1)
    assert counts(tx, "SKU-200") == (0, 1, 0, 0)
    assert counts(tx, "shipping") == (D("0.00"), D("4.95"), D("0.00"), D("0.00"))
    assert counts(tx, "discount") == (D("0.00"), D("-5.00"), D("0.00"), D("0.00"))
    assert [b.number for b in tx.bookings] == [1, 2, 3, 4, 5]
    assert tx.state == ledger.DELIVERED
    # the requests the reference says are now refused
    with pytest.raises(LedgerRefusal):
        ledger.cancel(tx, [item("SKU-100", 1, "12.50")], NOW)
    with pytest.raises(LedgerRefusal):
        ledger.return_goods(tx, [item("SKU-100", 2, "12.50")], NOW)
    with pytest.raises(LedgerRefusal):
        ledger.deliver(tx, [item("SKU-200", 1, "49.90", "-4.90")], NOW)


def test_refused_follow_up_changes_nothing() -> None:
    tx = order_100045()
    before = {k: vars(p).copy() for k, p in tx.positions.items()}
    # the first line is fine, the second over-delivers: nothing may be booked
    with pytest.raises(LedgerRefusal) as exc:
        ledger.deliver(tx, [item("SKU-100", 1, "12.50"), item("SKU-200", 2, "49.90", "-4.90")], NOW)
    assert exc.value.reason_code == 2300
    assert {k: vars(p) for k, p in tx.positions.items()} == before
    assert tx.bookings == []


@pytest.mark.parametrize(
    "line",
    [
        item("SKU-999", 1, "12.50"),
        item("SKU-100", 1, "12.00"),
        item("SKU-200", 1, "49.90"),
        BasketLine("item", D("12.50"), D("7"), "SKU-100", "", 1),
    ],
    ids=["unknown-position", "other-price", "missing-item-discount", "other-tax-rate"],
)
def test_position_not_as_authorised_is_refused(line: BasketLine) -> None:
    with pytest.raises(LedgerRefusal):
        ledger.deliver(order_100045(), [line], NOW)


def test_partial_deliveries_cancellations_and_returns_add_up() -> None:
    tx = order_100045()
    ledger.deliver(tx, [item("SKU-100", 1, "12.50")], NOW)
    ledger.deliver(tx, [item("SKU-100", 1, "12.50")], NOW)
    with pytest.raises(LedgerRefusal):  # one open, two asked
        ledger.cancel(tx, [item("SKU-100", 2, "12.50")], NOW)
    ledger.cancel(tx, [item("SKU-100", 1, "12.50")], NOW)
    ledger.return_goods(tx, [item("SKU-100", 1, "12.50")], NOW)
    ledger.return_goods(tx, [item("SKU-100", 1, "12.50")], NOW)
    with pytest.raises(LedgerRefusal):
        ledger.return_goods(tx, [item("SKU-100", 1, "12.50")], NOW)
    assert counts(tx, "SKU-100") == (0, 2, 1, 2)
    assert tx.invoiced == D("0.00")


def test_shipping_is_booked_by_amount_and_only_up_to_what_is_open() -> None:
    tx = order_100045()
    ledger.cancel(tx, [shipping("2.00")], NOW)
    with pytest.raises(LedgerRefusal):
        ledger.deliver(tx, [shipping("4.95")], NOW)
    ledger.deliver(tx, [shipping("2.95")], NOW)
    assert counts(tx, "shipping") == (D("0.00"), D("2.95"), D("2.00"), D("0.00"))


def test_full_cancellation_with_an_empty_basket_books_everything_open() -> None:
    tx = order_100045()
    ledger.deliver(tx, [item("SKU-100", 1, "12.50")], NOW)
    booking = ledger.cancel(tx, [], NOW)
    assert booking.positions == {
        "SKU-100": 2,
        "SKU-200": 1,
        "shipping": D("4.95"),
        "discount": D("-5.00"),
    }
    assert counts(tx, "SKU-100") == (0, 1, 2, 0)
    ledger.return_goods(tx, [], NOW)
    assert tx.state == ledger.CLOSED
    with pytest.raises(LedgerRefusal):  # nothing left to return
        ledger.return_goods(tx, [], NOW)


def test_credit_needs_a_delivery_and_may_not_exceed_the_invoiced_balance() -> None:
    tx = order_100045()
    with pytest.raises(LedgerRefusal):
        ledger.credit(tx, [voucher("-1.00")], NOW)
    ledger.deliver(tx, [item("SKU-100", 1, "12.50")], NOW)
    with pytest.raises(LedgerRefusal):
        ledger.credit(tx, [voucher("-12.51")], NOW)
    ledger.credit(tx, [voucher("-12.50")], NOW)
    assert tx.invoiced == D("0.00")


def test_change_order_replaces_the_open_part() -> None:
    tx = order_100045()
    ledger.deliver(tx, [item("SKU-100", 1, "12.50")], NOW)
    ledger.change_order(
        tx, [item("SKU-100", 1, "12.50"), item("SKU-210", 1, "30.00"), shipping("4.95")], NOW
    )
    assert counts(tx, "SKU-100") == (1, 1, 0, 0)
    assert counts(tx, "SKU-200") == (0, 0, 0, 0)
    assert counts(tx, "SKU-210") == (1, 0, 0, 0)
    assert tx.positions["discount"].open == 0
    with pytest.raises(LedgerRefusal):  # partly delivered position can't change its price
        ledger.change_order(tx, [item("SKU-100", 1, "11.00")], NOW)


def test_follow_ups_need_an_accepted_transaction() -> None:
    tx = order_100045()
    tx.state = ledger.DECLINED
    with pytest.raises(LedgerRefusal):
        ledger.deliver(tx, [item("SKU-100", 1, "12.50")], NOW)
