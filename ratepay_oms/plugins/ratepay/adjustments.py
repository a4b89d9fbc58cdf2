"""Goodwill credits and debits: what an order may still be credited or charged, and their rows.

RatePAY books both as a PAYMENT_CHANGE ``credit`` whose basket holds one ``<discount>``:
negative for a credit (the shopper owes less), positive for a debit (an adjustment charge,
where the contract allows it) — reference §4.6, §8.8. Only after a delivery (§5.1: "credit /
debit only after (part of) the order was delivered"). We refuse locally, before anything is
sent, what RatePAY would refuse:

- nothing delivered and not returned → no credit or debit yet;
- a credit above what the shopper owes now (delivered − returned value, shipping and voucher as
  settled, earlier credits and debits);
- a debit that would raise that above the amount RatePAY authorised (its risk check covered
  that much, no more) [INF, as the sandbox enforces].

Adjustments still in flight count as booked for these limits, so two quick credits cannot
together exceed the balance.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ratepay_oms.errors import OmsError
from ratepay_oms.orders import OrderInput, money
from ratepay_oms.persistence.models import INTENT_SETTLED, Intent, Order
from ratepay_oms.persistence.payment import (
    ADJ_BOOKED,
    ADJ_PENDING,
    ADJ_REFUSED,
    ADJUSTMENT_KINDS,
    CREDIT,
    DELIVERED,
    RatepayAdjustment,
)
from ratepay_oms.plugins.ratepay.basket import PRORATA, OrderLedger, Unit, special

ZERO = Decimal("0.00")


class AdjustmentError(OmsError):
    """A credit or debit that cannot be booked (says why and what is possible)."""


@dataclass(frozen=True)
class Balance:
    """What the shopper owes on an order now, as far as our ledger knows."""

    invoiced: Decimal
    authorised: Decimal
    delivered_units: int
    adjustments: Decimal
    """Σ credits (negative) and debits (positive), booked or in flight."""


def signed(kind: str, amount: Decimal) -> Decimal:
    return -amount if kind == CREDIT else amount


def balance(
    order: OrderInput,
    ledger: OrderLedger,
    units: Sequence[Unit],
    adjustments: Sequence[RatepayAdjustment],
) -> Balance:
    value = {u.item_id: u.unit_price_gross + u.discount for u in units}
    kept = ledger.delivered - ledger.returned
    total = sum((value[i] for i in kept if i in value), ZERO)
    shipping = special(order.shipping)
    if shipping is not None and ledger.shipping_status == DELIVERED:
        total += shipping.unit_price_gross
    discount = special(order.discount)
    if discount is not None:
        if ledger.voucher_rule == PRORATA:
            total += sum((ledger.voucher_shares.get(i, ZERO) for i in kept), ZERO)
        elif ledger.discount_status == DELIVERED:
            total += discount.unit_price_gross
    adjusted = sum(
        (signed(a.kind, a.amount) for a in adjustments if a.status in (ADJ_PENDING, ADJ_BOOKED)),
        ZERO,
    )
    return Balance(
        invoiced=money(total + adjusted),
        authorised=order.basket_amount,
        delivered_units=len(kept),
        adjustments=money(adjusted),
    )


def check_adjustment(kind: str, amount: Decimal, now: Balance, order_ref: str) -> None:
    """Raise ``AdjustmentError`` when RatePAY would refuse this credit or debit."""
    if kind not in ADJUSTMENT_KINDS:
        raise AdjustmentError(f"unknown adjustment {kind!r}: credit or debit")
    if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
        raise AdjustmentError(f"a {kind} needs a positive amount, e.g. 5.00")
    if amount != money(amount):
        raise AdjustmentError(f"a {kind} amount has at most two decimals, got {amount}")
    if now.delivered_units == 0:
        raise AdjustmentError(
            f"order {order_ref}: a {kind} is possible only after a delivery (RatePAY books "
            "credits and debits on the invoice); nothing is delivered and kept"
        )
    if kind == CREDIT and amount > now.invoiced:
        raise AdjustmentError(
            f"order {order_ref}: a credit of {amount} exceeds what the shopper owes "
            f"({now.invoiced}); at most {now.invoiced}"
        )
    if kind != CREDIT and now.invoiced + amount > now.authorised:
        room = max(now.authorised - now.invoiced, ZERO)
        raise AdjustmentError(
            f"order {order_ref}: a debit of {amount} would raise the invoice to "
            f"{now.invoiced + amount}, above the {now.authorised} RatePAY authorised; "
            f"at most {room}"
        )


def adjustments_of(session: Session, order_id: int) -> list[RatepayAdjustment]:
    return list(
        session.scalars(
            select(RatepayAdjustment)
            .where(RatepayAdjustment.order_id == order_id)
            .order_by(RatepayAdjustment.id)
        )
    )


def open_adjustment(
    session: Session,
    order_id: int,
    request_id: str,
    kind: str,
    amount: Decimal,
    tax_rate: Decimal,
    reason: str | None,
    now: datetime,
) -> RatepayAdjustment:
    """The row of request ``request_id``: the existing one (a retry of the same request), else
    a new ``pending`` one."""
    row = session.scalar(
        select(RatepayAdjustment).where(RatepayAdjustment.request_id == request_id)
    )
    if row is not None:
        return row
    row = RatepayAdjustment(
        request_id=request_id,
        order_id=order_id,
        kind=kind,
        amount=amount,
        tax_rate=tax_rate,
        reason=reason,
        status=ADJ_PENDING,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row


def settle_adjustment(
    row: RatepayAdjustment,
    *,
    booked: bool,
    now: datetime,
    transaction_id: str | None,
    result_code: int | str | None = None,
    reason_code: int | str | None = None,
    message: str | None = None,
) -> None:
    row.status = ADJ_BOOKED if booked else ADJ_REFUSED
    row.settled_at = now
    row.transaction_id = transaction_id
    row.result_code = None if result_code is None else str(result_code)
    row.reason_code = None if reason_code is None else str(reason_code)
    row.message = message


def default_tax_rate(order: OrderInput) -> Decimal:
    """The tax rate of a credit or debit when none is given: the highest of the order's items
    (Spryker's rule for a basket-level discount)."""
    return max(line.tax_rate for line in order.items)


# --- asking for one ---------------------------------------------------------------------------

CREDIT_COMMAND = "Ratepay/Credit"
"""The external command that books credits and debits (``Engine.run_external``)."""

_UNSENT = ("not_sent", "reconciled_not_booked", "resolved_not_booked")
"""Intent resolutions that mean the PAYMENT_CHANGE was certainly not booked."""


@dataclass(frozen=True)
class AdjustmentRequest:
    """What ``Engine.credit`` / ``debit`` hands the command (``CommandContext.data``)."""

    request_id: str
    kind: str
    amount: Decimal
    tax_rate: Decimal | None
    reason: str | None

    def to_data(self) -> dict[str, str | None]:
        return {
            "request_id": self.request_id,
            "kind": self.kind,
            "amount": str(self.amount),
            "tax_rate": None if self.tax_rate is None else str(self.tax_rate),
            "reason": self.reason,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> AdjustmentRequest:
        try:
            return cls(
                request_id=str(data["request_id"]),
                kind=str(data["kind"]),
                amount=Decimal(str(data["amount"])),
                tax_rate=None if data.get("tax_rate") is None else Decimal(str(data["tax_rate"])),
                reason=data.get("reason") or None,
            )
        except (KeyError, ArithmeticError, ValueError) as exc:
            raise AdjustmentError(f"incomplete credit/debit request: {exc}") from None


def find(session: Session, request_id: str) -> RatepayAdjustment | None:
    return session.scalar(
        select(RatepayAdjustment).where(RatepayAdjustment.request_id == request_id)
    )


def _intent_resolutions(session: Session, order_id: int) -> dict[str, tuple[str, str | None]]:
    """request id → (status, resolution) of the order's credit intents."""
    found: dict[str, tuple[str, str | None]] = {}
    rows = session.execute(
        select(Intent.summary, Intent.status, Intent.resolution).where(
            Intent.order_id == order_id, Intent.command == CREDIT_COMMAND
        )
    )
    for summary, status, resolution in rows:
        try:
            request_id = json.loads(summary).get("request_id")
        except ValueError:
            continue
        if request_id:
            found[str(request_id)] = (status, resolution)
    return found


def forget_unsent(session: Session, order_id: int) -> None:
    """Pending rows whose call certainly never booked (not sent, reconciled or resolved as
    not booked) become ``refused``, so they no longer count against the limits."""
    resolutions = _intent_resolutions(session, order_id)
    for row in adjustments_of(session, order_id):
        if row.status != ADJ_PENDING:
            continue
        status, resolution = resolutions.get(row.request_id, ("", None))
        if status == INTENT_SETTLED and resolution in _UNSENT:
            row.status = ADJ_REFUSED
            row.message = f"not booked at RatePAY ({resolution}); ask again if still wanted"


@dataclass(frozen=True)
class AdjustmentResult:
    """What became of a credit or debit asked for on the console or through the Engine."""

    order_ref: str
    kind: str
    amount: Decimal
    status: str
    """``booked``, ``refused`` or ``pending`` (sent, answer lost: the tick reconciles it)."""
    message: str | None
    errors: tuple[str, ...] = ()

    @property
    def booked(self) -> bool:
        return self.status == ADJ_BOOKED

    def describe(self) -> str:
        text = f"{self.kind} of {self.amount} on order {self.order_ref}: {self.status}"
        return text + (f" ({self.message})" if self.message and not self.booked else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "order_ref": self.order_ref,
            "kind": self.kind,
            "amount": str(self.amount),
            "status": self.status,
            "booked": self.booked,
            "message": self.message,
            "errors": list(self.errors),
        }


def book(
    engine: Any,
    kind: str,
    order_ref: str,
    amount: Decimal,
    *,
    tax_rate: Decimal | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> AdjustmentResult:
    """Book a credit or debit on ``order_ref`` exactly once through ``engine`` (an ``Engine``).

    Checked first against our ledger (``AdjustmentError``, nothing written, when RatePAY
    would refuse it), then run as the external command ``Ratepay/Credit`` and checked again
    under the order's lock. A reason longer than RatePAY's 255 characters is refused."""
    if reason is not None and len(reason) > 255:
        raise AdjustmentError("the reason is printed on RatePAY's letters: at most 255 characters")
    if tax_rate is not None and not (Decimal(0) <= tax_rate <= Decimal(100)):
        raise AdjustmentError(f"tax rate {tax_rate} is not a percentage")
    from ratepay_oms.plugins.ratepay import payment_store as store

    with engine.session() as session:
        order = session.scalar(select(Order).where(Order.order_ref == order_ref))
        if order is None:
            raise AdjustmentError(f"no order {order_ref!r}")
        data = store.order_input(order)
        ledger = store.load_ledger(session, order)
        forget_unsent(session, order.id)  # read-only here: not committed
        rows = adjustments_of(session, order.id)
        check_adjustment(kind, amount, balance(data, ledger, store.units(order.items), rows),
                         order_ref)
        session.rollback()
    request = AdjustmentRequest(uuid.uuid4().hex, kind, amount, tax_rate, reason)
    result = engine.run_external(CREDIT_COMMAND, order_ref, request.to_data(), now=now)
    with engine.session() as session:
        row = find(session, request.request_id)
        status = row.status if row is not None else ADJ_REFUSED
        message = row.message if row is not None else "; ".join(result.errors) or None
        if row is not None and row.status == ADJ_PENDING:
            resolution = _intent_resolutions(session, row.order_id).get(request.request_id)
            if resolution is not None and resolution[0] == INTENT_SETTLED:
                status, message = ADJ_REFUSED, f"not booked at RatePAY ({resolution[1]})"
            elif result.errors:
                message = "; ".join(result.errors)
    return AdjustmentResult(order_ref, kind, amount, status, message, tuple(result.errors))
