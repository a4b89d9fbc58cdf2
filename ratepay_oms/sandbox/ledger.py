"""The sandbox's per-transaction, per-position ledger and the rules RatePAY enforces on it.

Pure Python, no HTTP and no XML: ``protocol`` turns a request into ``BasketLine`` objects and
calls one booking function here. Every booking function validates the whole request against a
copy-free plan first and only then mutates, so a refused follow-up changes nothing (RatePAY's
follow-ups are all-or-nothing).

Units (reference §5.1): items are counted in units (``int``), the special positions
``shipping`` and ``discount`` by amount (``Decimal``, with the sign they were authorised with:
a voucher of −5.00 has ``ordered == Decimal("-5.00")``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

logger = logging.getLogger(__name__)

CENT = Decimal("0.01")
ZERO = Decimal("0.00")
SHIPPING = "shipping"
DISCOUNT = "discount"

# Transaction states, in the order a healthy transaction passes them.
INITIALIZED = "initialized"
REQUESTED = "requested"
DECLINED = "declined"
FAILED = "failed"
CONFIRMED = "confirmed"
PARTIALLY_DELIVERED = "partially_delivered"
DELIVERED = "delivered"
CANCELLED = "cancelled"
CLOSED = "closed"
ACCEPTED_STATES = frozenset(
    {REQUESTED, CONFIRMED, PARTIALLY_DELIVERED, DELIVERED, CANCELLED, CLOSED}
)


def money(value: Decimal) -> Decimal:
    """Two places, half up: the one rounding rule of the project."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


class LedgerRefusal(Exception):
    """A follow-up the gateway refuses; carries the reason code it answers with (mostly 2300)."""

    def __init__(self, message: str, reason_code: int = 2300) -> None:
        super().__init__(message)
        self.reason_code = reason_code


@dataclass(frozen=True)
class BasketLine:
    """One position of a request basket: an ``<item>``, the ``<shipping>`` or the ``<discount>``."""

    kind: str  # "item", SHIPPING or DISCOUNT
    unit_price_gross: Decimal
    tax_rate: Decimal
    article_number: str = ""
    unique_article_number: str = ""
    quantity: int = 1
    discount: Decimal = ZERO  # per-unit item discount (negative)
    name: str = ""

    @property
    def key(self) -> str:
        if self.kind != "item":
            return self.kind
        if self.unique_article_number:
            return f"{self.article_number}/{self.unique_article_number}"
        return self.article_number

    @property
    def is_item(self) -> bool:
        return self.kind == "item"

    @property
    def total(self) -> Decimal:
        """What this line contributes to the basket amount (unrounded)."""
        if self.is_item:
            return (self.unit_price_gross + self.discount) * self.quantity
        return self.unit_price_gross


def basket_sum(lines: list[BasketLine]) -> Decimal:
    """Σ (unit-price-gross + discount) × quantity + shipping + discount, rounded to cents."""
    return money(sum((line.total for line in lines), ZERO))


@dataclass
class PositionLedger:
    """What happened to one authorised position. Items count units, specials count amounts."""

    ordered: int | Decimal
    delivered: int | Decimal
    cancelled: int | Decimal
    returned: int | Decimal
    unit_price_gross: Decimal
    tax_rate: Decimal
    discount: Decimal = ZERO
    kind: str = "item"
    name: str = ""
    article_number: str = ""
    unique_article_number: str = ""

    @property
    def open(self) -> int | Decimal:
        return self.ordered - self.delivered - self.cancelled

    @property
    def returnable(self) -> int | Decimal:
        return self.delivered - self.returned

    def value(self, units: int | Decimal) -> Decimal:
        """The money value of ``units`` of this position (amounts pass through)."""
        if self.kind == "item":
            return money((self.unit_price_gross + self.discount) * units)
        return money(Decimal(units))

    def as_dict(self) -> dict[str, object]:
        def out(v: int | Decimal) -> int | str:
            return v if isinstance(v, int) else str(money(v))

        return {
            "kind": self.kind,
            "name": self.name,
            "ordered": out(self.ordered),
            "delivered": out(self.delivered),
            "cancelled": out(self.cancelled),
            "returned": out(self.returned),
            "open": out(self.open),
            "unit_price_gross": str(money(self.unit_price_gross)),
            "tax_rate": str(self.tax_rate),
            "discount": str(money(self.discount)),
        }


@dataclass(frozen=True)
class Booking:
    """One accepted ledger change."""

    number: int
    operation: str
    subtype: str | None
    positions: dict[str, int | Decimal]
    amount: Decimal
    time: datetime

    def as_dict(self) -> dict[str, object]:
        return {
            "booking_number": self.number,
            "operation": self.operation,
            "subtype": self.subtype,
            "positions": {
                k: (v if isinstance(v, int) else str(money(v))) for k, v in self.positions.items()
            },
            "amount": str(money(self.amount)),
            "time": self.time.isoformat(timespec="seconds"),
        }


@dataclass
class Transaction:
    """One RatePAY transaction as the sandbox keeps it."""

    transaction_id: str
    short_id: str
    profile_id: str
    created: datetime
    state: str = INITIALIZED
    order_id: str | None = None
    descriptor: str | None = None
    amount: Decimal = ZERO  # authorised basket amount (after change-orders)
    initial_amount: Decimal = ZERO  # the PAYMENT_REQUEST basket amount
    merchant_consumer_id: str | None = None
    requested_at: datetime | None = None  # when the PAYMENT_REQUEST was decided
    payment_method: str | None = None
    currency: str = "EUR"
    credited: Decimal = ZERO  # Σ of credit/debit bookings (negative = credit to the shopper)
    positions: dict[str, PositionLedger] = field(default_factory=dict)
    bookings: list[Booking] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return self.state in ACCEPTED_STATES

    @property
    def invoiced(self) -> Decimal:
        """Delivered minus returned value plus credits: what the shopper owes right now."""
        total = sum((p.value(p.returnable) for p in self.positions.values()), ZERO)
        return money(total + self.credited)

    def as_dict(self) -> dict[str, object]:
        """The sandbox's own view of the transaction (``GET /sandbox/transactions/{id}``), for
        audits from outside the process; RatePAY's status API is ``status_api.py``."""
        return {
            "transaction_id": self.transaction_id,
            "transaction_short_id": self.short_id,
            "state": self.state,
            "order_id": self.order_id,
            "descriptor": self.descriptor,
            "payment_method": self.payment_method,
            "currency": self.currency,
            "amount": str(money(self.amount)),
            "invoiced": str(self.invoiced),
            "credited": str(money(self.credited)),
            "created": self.created.isoformat(timespec="seconds"),
            "positions": {k: p.as_dict() for k, p in self.positions.items()},
            "bookings": [b.as_dict() for b in self.bookings],
        }


# --------------------------------------------------------------------------- bookings


def authorise(tx: Transaction, lines: list[BasketLine]) -> None:
    """Record the PAYMENT_REQUEST basket as the transaction's ordered positions."""
    tx.positions = {line.key: _new_position(line) for line in lines}
    tx.amount = basket_sum(lines)
    tx.initial_amount = tx.amount


def _new_position(line: BasketLine) -> PositionLedger:
    if line.is_item:
        return PositionLedger(
            line.quantity,
            0,
            0,
            0,
            line.unit_price_gross,
            line.tax_rate,
            line.discount,
            "item",
            line.name,
            line.article_number,
            line.unique_article_number,
        )
    return PositionLedger(
        line.unit_price_gross,
        ZERO,
        ZERO,
        ZERO,
        line.unit_price_gross,
        line.tax_rate,
        ZERO,
        line.kind,
        line.name,
    )


def _units(line: BasketLine) -> int | Decimal:
    return line.quantity if line.is_item else line.unit_price_gross


def _exceeds(units: int | Decimal, limit: int | Decimal) -> bool:
    """``units`` is more than ``limit``, by magnitude (special positions may be negative)."""
    if isinstance(units, Decimal) and (units < 0 or limit < 0):
        if units != 0 and limit != 0 and (units < 0) != (limit < 0):
            return True
        return abs(units) > abs(limit)
    return units > limit


def _match(tx: Transaction, line: BasketLine) -> PositionLedger:
    """The authorised position a follow-up line refers to, or a 2300 refusal."""
    pos = tx.positions.get(line.key)
    if pos is None:
        raise LedgerRefusal(f"position {line.key!r} was not authorised in the PAYMENT_REQUEST")
    if pos.tax_rate != line.tax_rate:
        raise LedgerRefusal(f"position {line.key!r} has another tax-rate than authorised")
    if line.is_item and (
        pos.unit_price_gross != line.unit_price_gross or pos.discount != line.discount
    ):
        raise LedgerRefusal(f"position {line.key!r} has another price than authorised")
    if line.is_item and line.quantity < 1:
        raise LedgerRefusal(f"position {line.key!r} has quantity below 1", reason_code=200)
    return pos


_LIMIT_TEXT = {"open": "open", "returnable": "delivered and not returned"}


def _plan(tx: Transaction, lines: list[BasketLine], limit_name: str) -> dict[str, int | Decimal]:
    """Validate every line against its limit (``open`` or ``returnable``) before touching."""
    plan: dict[str, int | Decimal] = {}
    for line in lines:
        if line.key in plan:
            raise LedgerRefusal(f"position {line.key!r} appears twice in the basket")
        pos = _match(tx, line)
        units = _units(line)
        limit = getattr(pos, limit_name)
        if units == 0 or _exceeds(units, limit):
            raise LedgerRefusal(
                f"position {line.key!r}: {units} requested but only {limit} "
                f"{_LIMIT_TEXT[limit_name]}"
            )
        plan[line.key] = units
    return plan


def _full(tx: Transaction, limit_name: str) -> dict[str, int | Decimal]:
    plan = {
        key: getattr(pos, limit_name)
        for key, pos in tx.positions.items()
        if getattr(pos, limit_name) != 0
    }
    if not plan:
        raise LedgerRefusal(f"nothing {limit_name} on the transaction")
    return plan


def _book(
    tx: Transaction,
    operation: str,
    subtype: str | None,
    plan: dict[str, int | Decimal],
    attr: str,
    now: datetime,
) -> Booking:
    amount = ZERO
    for key, units in plan.items():
        pos = tx.positions[key]
        setattr(pos, attr, getattr(pos, attr) + units)
        amount += pos.value(units)
    booking = Booking(len(tx.bookings) + 1, operation, subtype, dict(plan), money(amount), now)
    tx.bookings.append(booking)
    _settle_state(tx)
    return booking


def deliver(tx: Transaction, lines: list[BasketLine], now: datetime) -> Booking:
    """CONFIRMATION_DELIVER: each line at most what is open (ordered − delivered − cancelled)."""
    _require_accepted(tx)
    if not lines:
        raise LedgerRefusal("CONFIRMATION_DELIVER basket has no positions")
    plan = _plan(tx, lines, "open")
    return _book(tx, "CONFIRMATION_DELIVER", None, plan, "delivered", now)


def cancel(tx: Transaction, lines: list[BasketLine], now: datetime) -> Booking:
    """Cancellation of open units only; an empty basket cancels everything still open."""
    _require_accepted(tx)
    plan = _plan(tx, lines, "open") if lines else _full(tx, "open")
    return _book(tx, "PAYMENT_CHANGE", "cancellation", plan, "cancelled", now)


def return_goods(tx: Transaction, lines: list[BasketLine], now: datetime) -> Booking:
    """Return of delivered units only; an empty basket returns everything delivered."""
    _require_accepted(tx)
    plan = _plan(tx, lines, "returnable") if lines else _full(tx, "returnable")
    return _book(tx, "PAYMENT_CHANGE", "return", plan, "returned", now)


def credit(tx: Transaction, lines: list[BasketLine], now: datetime) -> Booking:
    """Goodwill credit (negative) or debit (positive) after delivery, as one ``<discount>``.

    A credit may not exceed what is currently invoiced (delivered − returned + earlier credits);
    a debit may not raise the invoiced balance above the authorised amount (RatePAY's risk check
    covered that much, no more) [INF].
    """
    _require_accepted(tx)
    if len(lines) != 1 or lines[0].kind != DISCOUNT:
        raise LedgerRefusal("a credit basket must hold exactly one <discount> and nothing else")
    amount = money(lines[0].unit_price_gross)
    if amount == 0:
        raise LedgerRefusal("a credit of 0.00 books nothing")
    if not any(p.returnable for p in tx.positions.values() if p.kind == "item"):
        raise LedgerRefusal("credit only after delivery: no delivered, unreturned item")
    if amount < 0 and -amount > tx.invoiced:
        raise LedgerRefusal(f"credit {-amount} exceeds the invoiced balance {tx.invoiced}")
    if amount > 0 and tx.invoiced + amount > tx.amount:
        raise LedgerRefusal(
            f"debit {amount} would raise the invoiced balance {tx.invoiced} above the "
            f"authorised amount {money(tx.amount)}"
        )
    tx.credited = money(tx.credited + amount)
    booking = Booking(
        len(tx.bookings) + 1, "PAYMENT_CHANGE", "credit", {"credit": amount}, amount, now
    )
    tx.bookings.append(booking)
    return booking


def change_order(tx: Transaction, lines: list[BasketLine], now: datetime) -> Booking:
    """Replace the open (undelivered) part by ``lines``: the complete new open basket.

    Per position: ``ordered = delivered + cancelled + new open``. A position that is absent from
    the new basket has nothing open afterwards. Changing the price of a position that already
    has delivered or cancelled units is refused (send it under a new unique-article-number).
    """
    _require_accepted(tx)
    seen: set[str] = set()
    new: dict[str, PositionLedger] = {}
    for line in lines:
        if line.key in seen:
            raise LedgerRefusal(f"position {line.key!r} appears twice in the basket")
        seen.add(line.key)
        pos = tx.positions.get(line.key)
        touched = pos is not None and (pos.delivered != 0 or pos.cancelled != 0)
        if (
            pos is not None
            and touched
            and (
                pos.tax_rate != line.tax_rate
                or (
                    line.is_item
                    and (
                        pos.unit_price_gross != line.unit_price_gross
                        or pos.discount != line.discount
                    )
                )
            )
        ):
            raise LedgerRefusal(f"position {line.key!r} is partly settled; its price can't change")
    plan: dict[str, int | Decimal] = {}
    for line in lines:
        pos = tx.positions.get(line.key)
        units = _units(line)
        if pos is None or (pos.delivered == 0 and pos.cancelled == 0):
            new[line.key] = _new_position(line)
        else:
            new[line.key] = PositionLedger(
                pos.delivered + pos.cancelled + units,
                pos.delivered,
                pos.cancelled,
                pos.returned,
                pos.unit_price_gross,
                pos.tax_rate,
                pos.discount,
                pos.kind,
                line.name,
                pos.article_number,
                pos.unique_article_number,
            )
        plan[line.key] = units
    for key, pos in tx.positions.items():
        if key not in seen:
            new[key] = PositionLedger(
                pos.delivered + pos.cancelled,
                pos.delivered,
                pos.cancelled,
                pos.returned,
                pos.unit_price_gross,
                pos.tax_rate,
                pos.discount,
                pos.kind,
                pos.name,
                pos.article_number,
                pos.unique_article_number,
            )
            if pos.open:
                plan[key] = 0 if pos.kind == "item" else ZERO
    tx.positions = new
    tx.amount = money(sum((p.value(p.ordered - p.cancelled) for p in new.values()), ZERO))
    amount = money(sum((p.value(p.open) for p in new.values()), ZERO))
    booking = Booking(len(tx.bookings) + 1, "PAYMENT_CHANGE", "change-order", plan, amount, now)
    tx.bookings.append(booking)
    _settle_state(tx)
    return booking


def _require_accepted(tx: Transaction) -> None:
    if not tx.accepted:
        raise LedgerRefusal(
            f"transaction is {tx.state}; follow-ups need an accepted PAYMENT_REQUEST"
        )


def _settle_state(tx: Transaction) -> None:
    """Derive the transaction's state from its positions after a booking."""
    anything_open = any(p.open != 0 for p in tx.positions.values())
    anything_delivered = any(p.delivered != 0 for p in tx.positions.values())
    anything_kept = any(p.returnable != 0 for p in tx.positions.values())
    if anything_open:
        if anything_delivered:
            tx.state = PARTIALLY_DELIVERED
        elif tx.state not in (REQUESTED, CONFIRMED):
            tx.state = CONFIRMED if tx.order_id else REQUESTED
    elif anything_kept:
        tx.state = DELIVERED
    elif anything_delivered:
        tx.state = CLOSED
    else:
        tx.state = CANCELLED
