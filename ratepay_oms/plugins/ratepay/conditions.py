"""The RatePAY OMS conditions: each reads what the last command recorded for *this item*.

Spryker's conditions read one order-level result code, so a failed partial refund after a
successful one still passes. Ours read the newest outcome row of the item for the action the
command performed, written in the same transaction as the command's state change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ratepay_oms.engine.plugins import Condition
from ratepay_oms.engine.verdict import Verdict
from ratepay_oms.persistence.payment import (
    CANCELLATION,
    DELIVERY,
    PAYMENT_CONFIRM,
    PAYMENT_REQUEST,
    RETURN,
)
from ratepay_oms.plugins.ratepay.payment_store import latest_outcome
from ratepay_oms.ratepay.codes import is_decline

if TYPE_CHECKING:
    from ratepay_oms.engine.plugins import CommandContext
    from ratepay_oms.persistence.models import Order, OrderItem
    from ratepay_oms.persistence.payment import RatepayItemOutcome


def _read(action: str, outcome: RatepayItemOutcome | None) -> dict[str, Any]:
    """What a condition looked at, for ``explain``: the outcome row it decided on."""
    if outcome is None:
        return {"action": action, "outcome": None}
    return {
        "action": action,
        "outcome": {
            "id": outcome.id,
            "success": bool(outcome.success),
            "operation": outcome.operation,
            "subtype": outcome.subtype,
            "result_code": outcome.result_code,
            "reason_code": outcome.reason_code,
            "message": outcome.message,
            "created_at": outcome.created_at.isoformat(),
        },
    }


@dataclass(frozen=True)
class OutcomeSucceeded(Condition):
    """True when the item's newest outcome of ``action`` is a success."""

    action: str

    def check(self, ctx: CommandContext, order: Order, item: OrderItem) -> Verdict:
        outcome = latest_outcome(ctx.session, item.id, self.action)
        holds = outcome is not None and bool(outcome.success)
        return Verdict(holds, _read(self.action, outcome))


@dataclass(frozen=True)
class PaymentRequestDeclined(Condition):
    """True when RatePAY declined the item's newest payment request (result 401, or 150 with
    reason 730 "buyer identity"): a risk decision, not a technical failure, so retrying is
    pointless; the shopper needs another method (``payment.customer_message`` says so)."""

    def check(self, ctx: CommandContext, order: Order, item: OrderItem) -> Verdict:
        outcome = latest_outcome(ctx.session, item.id, PAYMENT_REQUEST)
        holds = (
            outcome is not None
            and not outcome.success
            and is_decline(_code(outcome.result_code), _code(outcome.reason_code))
        )
        return Verdict(holds, _read(PAYMENT_REQUEST, outcome))


def _code(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


CONDITIONS: dict[str, Condition] = {
    "Ratepay/IsPaymentRequestSuccess": OutcomeSucceeded(PAYMENT_REQUEST),
    "Ratepay/IsPaymentRequestDeclined": PaymentRequestDeclined(),
    "Ratepay/IsPaymentConfirmed": OutcomeSucceeded(PAYMENT_CONFIRM),
    "Ratepay/IsDeliveryConfirmed": OutcomeSucceeded(DELIVERY),
    "Ratepay/IsCancellationConfirmed": OutcomeSucceeded(CANCELLATION),
    "Ratepay/IsRefunded": OutcomeSucceeded(RETURN),
}
