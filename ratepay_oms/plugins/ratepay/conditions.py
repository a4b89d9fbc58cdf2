"""The RatePAY OMS conditions: each reads what the last command recorded for *this item*.

Spryker's conditions read one order-level result code, so a failed partial refund after a
successful one still passes. Ours read the newest outcome row of the item for the action the
command performed, written in the same transaction as the command's state change (read once
per group for all the order's items, see :func:`newest_outcome`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
from ratepay_oms.plugins.ratepay.payment_store import OUTCOMES_MEMO, Outcome, latest_outcomes
from ratepay_oms.ratepay.codes import is_decline

if TYPE_CHECKING:
    from ratepay_oms.engine.plugins import CommandContext
    from ratepay_oms.persistence.models import Order, OrderItem


def _read(action: str, outcome: Outcome | None) -> dict[str, Any]:
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


DETAIL_MEMO = "ratepay.detail_json"
"""``ctx.memo`` key of the JSON templates of :func:`_verdict` (one group's lifetime)."""

_ID_MARK = -7_391_046_282_513
"""Stands for the outcome id while a template is encoded (no outcome has a negative id)."""


def _verdict(ctx: CommandContext, holds: bool, action: str, outcome: Outcome | None) -> Verdict:
    """``holds`` with what was read, and that read already as JSON: the items of one group
    mostly read outcomes that differ only in their id (one command wrote them all at once),
    so the JSON is encoded once per distinct rest (kept for the group in ``ctx.memo``, with
    the read's other values) and the id spliced in. The text is the same as
    ``json.dumps(read, sort_keys=True, default=str)``, which the engine would otherwise run
    per item."""
    if outcome is None or type(outcome.id) is not int:
        return Verdict(holds, _read(action, outcome))
    return _templated(_templates(ctx), holds, action, outcome, bool(outcome.success))


_Templates = dict[tuple[Any, ...], tuple[tuple[str, str] | None, dict[str, Any]]]


def _templates(ctx: CommandContext) -> _Templates:
    found: _Templates = ctx.memo.setdefault(DETAIL_MEMO, {})
    return found


def _templated(
    templates: _Templates, holds: bool, action: str, outcome: Outcome, success: bool
) -> Verdict:
    """:func:`_verdict` of an outcome with an ``int`` id (``success``: ``bool(outcome.success)``),
    its group's ``templates`` at hand."""
    key = (action, success, outcome.operation, outcome.subtype,
           outcome.result_code, outcome.reason_code, outcome.message, outcome.created_at)
    found = templates.get(key)
    if found is None:
        read = _read(action, outcome)
        inner = read["outcome"]
        marked = {**read, "outcome": {**inner, "id": _ID_MARK}}
        pieces = json.dumps(marked, default=str, sort_keys=True).split(str(_ID_MARK))
        parts = (pieces[0], pieces[1]) if len(pieces) == 2 else None
        templates[key] = (parts, inner)
    else:
        parts, inner = found
        read = {"action": action, "outcome": {**inner, "id": outcome.id}}
    if parts is None:
        return Verdict(holds, read)
    return Verdict(holds, read, f"{parts[0]}{outcome.id}{parts[1]}")


@dataclass(frozen=True)
class OutcomeSucceeded(Condition):
    """True when the item's newest outcome of ``action`` is a success."""

    action: str

    def check(self, ctx: CommandContext, order: Order, item: OrderItem) -> Verdict:
        outcome = newest_outcome(ctx, order, item, self.action)
        holds = outcome is not None and bool(outcome.success)
        return _verdict(ctx, holds, self.action, outcome)

    def check_many(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> list[Verdict]:
        """:meth:`check` for a group's items: the outcomes looked up once, and one verdict
        per distinct outcome but its id (the items of one call share all the rest)."""
        outcomes = newest_outcomes(ctx, order, self.action)
        action = self.action
        templates = _templates(ctx)
        verdicts = []
        for item in items:
            outcome = outcomes.get(item.id)
            if outcome is None or type(outcome.id) is not int:
                holds = outcome is not None and bool(outcome.success)
                verdicts.append(_verdict(ctx, holds, action, outcome))
            else:
                success = bool(outcome.success)
                verdicts.append(_templated(templates, success, action, outcome, success))
        return verdicts

    def reads_database(self, ctx: CommandContext, order: Order) -> bool:
        return not outcomes_at_hand(ctx, order, self.action)


@dataclass(frozen=True)
class PaymentRequestDeclined(Condition):
    """True when RatePAY declined the item's newest payment request (result 401, or 150 with
    reason 730 "buyer identity"): a risk decision, not a technical failure, so retrying is
    pointless; the shopper needs another method (``payment.customer_message`` says so)."""

    def check(self, ctx: CommandContext, order: Order, item: OrderItem) -> Verdict:
        outcome = newest_outcome(ctx, order, item, PAYMENT_REQUEST)
        holds = (
            outcome is not None
            and not outcome.success
            and is_decline(_code(outcome.result_code), _code(outcome.reason_code))
        )
        return _verdict(ctx, holds, PAYMENT_REQUEST, outcome)

    def reads_database(self, ctx: CommandContext, order: Order) -> bool:
        return not outcomes_at_hand(ctx, order, PAYMENT_REQUEST)


def outcomes_at_hand(ctx: CommandContext, order: Order, action: str) -> bool:
    """Whether :func:`newest_outcomes` answers from ``ctx.memo`` (read before, or primed by
    the command's ``apply``) instead of reading the database."""
    return (OUTCOMES_MEMO, order.id, action) in ctx.memo


def newest_outcome(
    ctx: CommandContext, order: Order, item: OrderItem, action: str
) -> Outcome | None:
    """The item's newest outcome of ``action`` (see :func:`newest_outcomes`)."""
    return newest_outcomes(ctx, order, action).get(item.id)


def newest_outcomes(ctx: CommandContext, order: Order, action: str) -> dict[int, Outcome]:
    """The newest outcome of ``action`` per item of the order, read once per group for all
    its items (kept in ``ctx.memo``: a context lives for one group, and its command has run
    before the first check, so nothing writes outcomes between the read and the last
    check)."""
    key = (OUTCOMES_MEMO, order.id, action)  # or primed by the command's apply
    outcomes: dict[int, Outcome] | None = ctx.memo.get(key)
    if outcomes is None:
        outcomes = ctx.memo[key] = latest_outcomes(ctx.session, order.id, action)
    return outcomes


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
