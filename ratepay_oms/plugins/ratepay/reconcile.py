"""What RatePAY booked, read from the transaction status lookup, against what an intent sent.

A booking intent's summary carries, for each position it names, our ledger's figure *before*
the call (units delivered / cancelled / returned, or the special position's amount) and what
the call adds. The status lookup reports the gateway's figures now. For every position of the
call: gateway = before + added → booked; gateway = before → not booked. All positions must
agree; anything else (some booked, some not, or numbers that fit neither) is not guessed at:
the verdict is ``None`` and a person decides.

The shape read here is the sandbox's equivalent of RatePAY's Transaction Status API
(``GET /order/status/v2/transactions/{id}``): ``state``, ``descriptor``, and ``positions``
keyed like the request's positions (``article-number[/unique-article-number]``, ``shipping``,
``discount``) with ``ordered`` / ``delivered`` / ``cancelled`` / ``returned`` figures.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from ratepay_oms.engine.plugins import Reconciled
from ratepay_oms.persistence.payment import CANCELLED, DELIVERED, RETURNED
from ratepay_oms.plugins.ratepay.basket import BasketLine, BasketPlan, OrderLedger

SHIPPING = "shipping"
DISCOUNT = "discount"

# Transaction states of the status lookup.
_NOT_YET_REQUESTED = {"initialized"}
_DECLINED = {"declined", "failed"}
_NOT_YET_CONFIRMED = {"requested"}
_CONFIRMED_OR_LATER = {"confirmed", "partially_delivered", "delivered", "cancelled", "closed"}


def position_key(line: BasketLine) -> str:
    if line.unique_article_number:
        return f"{line.article_number}/{line.unique_article_number}"
    return line.article_number


def _special_before(status: str, field: str, amount: Decimal) -> str:
    """Our figure for a special position in ``field`` (an amount) given its status."""
    booked_in = {
        "delivered": (DELIVERED, RETURNED),
        "cancelled": (CANCELLED,),
        "returned": (RETURNED,),
    }[field]
    return str(amount if status in booked_in else Decimal("0.00"))


def booking_summary(
    *,
    operation: str,
    subtype: str | None,
    field: str,
    transaction_id: str,
    order_ref: str,
    plan: BasketPlan,
    everything: BasketPlan,
    ledger: OrderLedger,
) -> dict[str, Any]:
    """The intent summary of a delivery / cancellation / return (see the module docstring)."""
    ours = {"delivered": ledger.delivered, "cancelled": ledger.cancelled,
            "returned": ledger.returned}[field]
    units_of = {position_key(line): set(line.item_ids) for line in everything.lines}
    positions: dict[str, dict[str, str | int]] = {}
    for line in plan.lines:
        key = position_key(line)
        positions[key] = {"before": len(units_of.get(key, set()) & ours), "add": line.quantity}
    if plan.shipping is not None:
        amount = plan.shipping.unit_price_gross
        positions[SHIPPING] = {
            "before": _special_before(ledger.shipping_status, field, amount),
            "add": str(amount),
        }
    if plan.discount is not None:
        amount = plan.discount.unit_price_gross
        positions[DISCOUNT] = {
            "before": str(plan.discount_before)
            if plan.discount_before is not None  # pro-rata voucher: booked in shares
            else _special_before(ledger.discount_status, field, amount),
            "add": str(amount),
        }
    subject = f"{operation}/{subtype}" if subtype else operation
    return {
        "describe": f"{subject} of order {order_ref}",
        "operation": operation,
        "subtype": subtype,
        "field": field,
        "transaction_id": transaction_id,
        "order_ref": order_ref,
        "positions": positions,
        "amount": str(plan_amount(plan)),
        "shipping": plan.shipping is not None,
        "discount": plan.discount is not None,
    }


def plan_amount(plan: BasketPlan) -> Decimal:
    total = sum((line.total for line in plan.lines), Decimal("0.00"))
    for special in (plan.shipping, plan.discount):
        if special is not None:
            total += special.unit_price_gross
    return total


def _number(value: object) -> Decimal | None:
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def verdict(summary: dict[str, Any], status: dict[str, Any]) -> Reconciled | None:
    """Booked, not booked, or ``None`` when the status does not say clearly."""
    state = status.get("state")
    operation = summary["operation"]
    if operation == "PAYMENT_REQUEST":
        if state in _NOT_YET_REQUESTED:
            return Reconciled(False, detail=f"transaction is still {state}")
        if state in _DECLINED:
            return Reconciled(True, {"accepted": False}, f"transaction is {state}")
        if state in _NOT_YET_CONFIRMED | _CONFIRMED_OR_LATER:
            return Reconciled(
                True,
                {"accepted": True, "descriptor": status.get("descriptor")},
                f"transaction is {state}",
            )
        return None
    if operation == "PAYMENT_CONFIRM":
        if state in _NOT_YET_CONFIRMED:
            return Reconciled(False, detail="transaction is not confirmed")
        if state in _CONFIRMED_OR_LATER:
            return Reconciled(True, None, f"transaction is {state}")
        return None
    return _booking_verdict(summary, status)


def _booking_verdict(summary: dict[str, Any], status: dict[str, Any]) -> Reconciled | None:
    field = summary["field"]
    at_gateway = status.get("positions")
    if not isinstance(at_gateway, dict):
        return None
    seen: set[str] = set()
    details: list[str] = []
    for key, figures in summary["positions"].items():
        position = at_gateway.get(key)
        if not isinstance(position, dict):
            return None
        now = _number(position.get(field))
        before = _number(figures["before"])
        added = _number(figures["add"])
        if now is None or before is None or added is None:
            return None
        if now == before + added and added != 0:
            seen.add("booked")
        elif now == before:
            seen.add("not booked")
        else:
            return None
        details.append(f"{key} {field} {now}")
    if len(seen) != 1:
        return None
    booked = seen == {"booked"}
    return Reconciled(booked, None, "status lookup: " + ", ".join(details))
