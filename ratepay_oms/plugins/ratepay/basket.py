"""Order items → RatePAY shopping baskets, and when shipping costs and the voucher go along.

RatePAY keeps a ledger per position (reference §5.1): each article (``article-number`` plus
``unique-article-number`` when two lines share a SKU) counted in units, and the two special
positions ``<shipping>`` and ``<discount>`` by amount. Every follow-up (delivery, cancellation,
return) must name exactly the positions it changes, and the basket ``amount`` must equal their
sum and be ≥ 0. The rules below decide, from our own ledger (``OrderLedger``: which item units
RatePAY confirmed as delivered, cancelled or returned, and where the special positions stand),
which special positions ride along with which call, so that RatePAY's invoiced balance always
equals what the customer owes. docs/processes.md explains them with examples.

- Shipping costs: delivered with the first delivery; cancelled with the last open item when
  nothing was delivered; returned with the last delivered item when everything delivered has
  come back and nothing is open any more.
- Order discount (voucher), by the order's ``voucher_rule`` (setting ``VOUCHER_RULE``, kept on
  the payment when the order is requested; docs/processes.md says which to choose and why):

  * ``last_delivery``: delivered with the delivery that leaves no open item (the worked
    example: CD #2 = tea pot + voucher); cancelled with the last open item (whether or not
    something was delivered before: a voucher cannot be delivered on its own, because a basket
    of only a negative position is refused); returned with the last returned item. When the
    basket with the voucher would be negative, the voucher stays where it is and a warning is
    logged (it cannot be settled without a goodwill credit).
  * ``prorata``: the voucher is split once over the order's units in proportion to their value
    (``voucher_shares``: cents by largest remainder, so the shares add up to the voucher
    exactly), and every delivery, cancellation and return carries the shares of its units, as
    RatePAY's own partial-return sample does (item 10.00 with −5.00 of a −15.00 discount).
    Each invoice then shows what the shopper owes for what was shipped, and a return can never
    take back more voucher than was delivered.

Everything here is pure: no database, no HTTP, so the rules are tested on their own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal

from ratepay_oms.orders import OrderInput, PositionInput, money
from ratepay_oms.persistence.payment import CANCELLED, DELIVERED, OPEN, RETURNED

log = logging.getLogger(__name__)

ZERO = Decimal("0.00")
CENT = Decimal("0.01")

LAST_DELIVERY = "last_delivery"
PRORATA = "prorata"


@dataclass(frozen=True)
class Unit:
    """One item row (one unit of one order line), as far as the basket needs it."""

    item_id: int
    line_no: int
    sku: str
    name: str
    unit_price_gross: Decimal
    tax_rate: Decimal
    discount: Decimal = ZERO


@dataclass(frozen=True)
class BasketLine:
    """One ``<item>``: the units of one order line that this call covers."""

    article_number: str
    unique_article_number: str | None
    name: str
    quantity: int
    unit_price_gross: Decimal
    tax_rate: Decimal
    discount: Decimal
    category: str | None
    item_ids: tuple[int, ...]

    @property
    def total(self) -> Decimal:
        return money((self.unit_price_gross + self.discount) * self.quantity)


@dataclass(frozen=True)
class BasketPlan:
    """A whole ``<shopping-basket>``: item lines plus the special positions sent now."""

    currency: str
    lines: tuple[BasketLine, ...]
    shipping: PositionInput | None = None
    discount: PositionInput | None = None
    discount_before: Decimal | None = None
    """``prorata`` only: the voucher amount already booked in the field this call raises
    (delivered / cancelled / returned), for the intent's summary; ``None``: all or nothing."""

    @property
    def amount(self) -> Decimal:
        total = sum((line.total for line in self.lines), ZERO)
        if self.shipping is not None:
            total += self.shipping.unit_price_gross
        if self.discount is not None:
            total += self.discount.unit_price_gross
        return money(total)

    @property
    def item_ids(self) -> tuple[int, ...]:
        return tuple(i for line in self.lines for i in line.item_ids)


@dataclass
class OrderLedger:
    """Our record of what RatePAY booked for one order (from the per-item outcome rows)."""

    all_items: set[int]
    delivered: set[int] = field(default_factory=set)
    cancelled: set[int] = field(default_factory=set)
    returned: set[int] = field(default_factory=set)
    shipping_status: str = OPEN
    discount_status: str = OPEN
    voucher_rule: str = LAST_DELIVERY
    voucher_shares: dict[int, Decimal] = field(default_factory=dict)
    """``prorata``: each unit's share of the voucher (``voucher_shares``)."""

    @property
    def open(self) -> set[int]:
        return self.all_items - self.delivered - self.cancelled


def special(position: PositionInput | None) -> PositionInput | None:
    """A zero-valued shipping or discount position is not sent at all (as Spryker does)."""
    if position is None or position.unit_price_gross == ZERO:
        return None
    return position


def unique_numbers(order: OrderInput) -> dict[int, str | None]:
    """``unique-article-number`` per line: the line number, but only for lines whose SKU
    appears on more than one line (RatePAY must tell the positions apart; a plain order keeps
    the plain article number, as in the reference's examples)."""
    counts: dict[str, int] = {}
    for line in order.items:
        counts[line.sku] = counts.get(line.sku, 0) + 1
    return {
        no: (str(no + 1) if counts[line.sku] > 1 else None) for no, line in enumerate(order.items)
    }


def lines_for(order: OrderInput, units: Iterable[Unit]) -> tuple[BasketLine, ...]:
    """Group units by order line (quantity = number of units), in order-line order."""
    by_line: dict[int, list[Unit]] = {}
    for unit in units:
        by_line.setdefault(unit.line_no, []).append(unit)
    uniques = unique_numbers(order)
    lines = []
    for line_no in sorted(by_line):
        group = sorted(by_line[line_no], key=lambda u: u.item_id)
        first = group[0]
        category = order.items[line_no].category if line_no < len(order.items) else None
        lines.append(
            BasketLine(
                article_number=first.sku,
                unique_article_number=uniques.get(line_no),
                name=first.name,
                quantity=len(group),
                unit_price_gross=money(first.unit_price_gross),
                tax_rate=first.tax_rate,
                discount=money(first.discount),
                category=category,
                item_ids=tuple(u.item_id for u in group),
            )
        )
    return tuple(lines)


def voucher_shares(discount: Decimal, units: Sequence[Unit]) -> dict[int, Decimal]:
    """Split the (negative) voucher over the units in proportion to their value (unit price +
    item discount): each share cut to the cent toward zero, the cents left over going to the
    largest remainders (ties: lower item id), so the shares add up to ``discount`` exactly and
    the split never changes once the order is placed."""
    if not units or discount == ZERO:
        return {}
    values = {u.item_id: u.unit_price_gross + u.discount for u in units}
    total = sum(values.values(), ZERO)
    if total <= 0:  # nothing to weigh by: equal parts
        values = dict.fromkeys(values, Decimal(1))
        total = Decimal(len(values))
    exact = {i: discount * v / total for i, v in values.items()}
    shares = {i: x.quantize(CENT, rounding=ROUND_DOWN) for i, x in exact.items()}
    left = discount - sum(shares.values(), ZERO)  # ≤ 0, whole cents
    step = CENT if left > 0 else -CENT
    order = sorted(exact, key=lambda i: (-abs(exact[i] - shares[i]), i))
    for i in order[: int(abs(left) / CENT)]:
        shares[i] += step
    return shares


def _prorata(
    plan: BasketPlan, discount: PositionInput, ledger: OrderLedger, ids: set[int], done: set[int]
) -> BasketPlan:
    """``plan`` with the voucher shares of the units ``ids``; ``done`` are the units already
    booked in the same field (their shares are the ``discount_before``)."""
    share = sum((ledger.voucher_shares.get(i, ZERO) for i in ids), ZERO)
    if share == ZERO:
        return plan
    before = sum((ledger.voucher_shares.get(i, ZERO) for i in done), ZERO)
    position = PositionInput(discount.name, share, discount.tax_rate)
    candidate = BasketPlan(plan.currency, plan.lines, plan.shipping, position, before)
    if candidate.amount < ZERO:
        log.warning(
            "voucher share %s not sent: the basket would be %s", share, candidate.amount
        )
        return plan
    return candidate


def full_basket(order: OrderInput, units: Sequence[Unit]) -> BasketPlan:
    """The PAYMENT_REQUEST basket: every unit, shipping and the voucher."""
    return BasketPlan(
        currency=order.currency,
        lines=lines_for(order, units),
        shipping=special(order.shipping),
        discount=special(order.discount),
    )


def _with_discount(plan: BasketPlan, discount: PositionInput, what: str) -> BasketPlan:
    candidate = BasketPlan(plan.currency, plan.lines, plan.shipping, discount)
    if candidate.amount < ZERO:
        log.warning(
            "voucher %s (%s) not sent with this %s: the basket would be %s; it stays %s",
            discount.name,
            discount.unit_price_gross,
            what,
            candidate.amount,
            "as it is",
        )
        return plan
    return candidate


def delivery_basket(order: OrderInput, ledger: OrderLedger, units: Sequence[Unit]) -> BasketPlan:
    """CONFIRMATION_DELIVER of ``units``; shipping with the first delivery, the voucher with
    the delivery that leaves no open item."""
    ids = {u.item_id for u in units}
    plan = BasketPlan(order.currency, lines_for(order, units))
    shipping = special(order.shipping)
    if shipping is not None and ledger.shipping_status == OPEN:
        plan = BasketPlan(plan.currency, plan.lines, shipping, None)
    discount = special(order.discount)
    if discount is not None and ledger.voucher_rule == PRORATA:
        plan = _prorata(plan, discount, ledger, ids, ledger.delivered)
    elif discount is not None and ledger.discount_status == OPEN and not (ledger.open - ids):
        plan = _with_discount(plan, discount, "delivery")
    return plan


def cancellation_basket(
    order: OrderInput, ledger: OrderLedger, units: Sequence[Unit]
) -> BasketPlan:
    """PAYMENT_CHANGE cancellation of ``units``; shipping with the last open item when
    nothing was delivered, the voucher with the last open item."""
    ids = {u.item_id for u in units}
    plan = BasketPlan(order.currency, lines_for(order, units))
    last_open = not (ledger.open - ids)
    shipping = special(order.shipping)
    nothing_delivered = not ledger.delivered
    if shipping is not None and ledger.shipping_status == OPEN and last_open and nothing_delivered:
        plan = BasketPlan(plan.currency, plan.lines, shipping, None)
    discount = special(order.discount)
    if discount is not None and ledger.voucher_rule == PRORATA:
        plan = _prorata(plan, discount, ledger, ids, ledger.cancelled)
    elif discount is not None and ledger.discount_status == OPEN and last_open:
        plan = _with_discount(plan, discount, "cancellation")
    return plan


def return_basket(order: OrderInput, ledger: OrderLedger, units: Sequence[Unit]) -> BasketPlan:
    """PAYMENT_CHANGE return of ``units``; shipping and the voucher go back with the last
    delivered unit, once nothing is open any more."""
    ids = {u.item_id for u in units}
    plan = BasketPlan(order.currency, lines_for(order, units))
    everything_back = not (ledger.delivered - ledger.returned - ids) and not ledger.open
    shipping = special(order.shipping)
    if shipping is not None and ledger.shipping_status == DELIVERED and everything_back:
        plan = BasketPlan(plan.currency, plan.lines, shipping, None)
    discount = special(order.discount)
    if discount is not None and ledger.voucher_rule == PRORATA:
        plan = _prorata(plan, discount, ledger, ids, ledger.returned)
    elif discount is not None and ledger.discount_status == DELIVERED and everything_back:
        plan = _with_discount(plan, discount, "return")
    return plan


def settle_specials(
    ledger: OrderLedger, plan: BasketPlan, new_status: str
) -> tuple[str, str]:
    """The special positions' status after ``plan`` was booked (``new_status`` is
    ``delivered``, ``cancelled`` or ``returned``)."""
    assert new_status in (DELIVERED, CANCELLED, RETURNED)
    shipping = new_status if plan.shipping is not None else ledger.shipping_status
    discount = new_status if plan.discount is not None else ledger.discount_status
    return shipping, discount
