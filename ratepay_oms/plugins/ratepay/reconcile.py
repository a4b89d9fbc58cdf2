"""What RatePAY booked, read from its Transaction Status API, against what an intent sent.

A booking intent's summary carries, for each item position it names, our ledger's figure
*before* the call (units delivered / cancelled / returned) and what the call adds, plus the
ordered units of every item position of the order and the wall-clock time the call was planned
(``planned_at``, UTC). The status API (``RatepayFacade.transaction_status``, reference
``ratepay-transaction-status-api.md``) lists per position the units RatePAY holds as open,
shipped and returned; from them:

* delivered = shipped + returned (a returned unit was delivered first);
* returned  = returned;
* cancelled = ordered − open − shipped − returned (cancelled units are in no list).

For every item position of the call: RatePAY's figure = before + added → booked; = before →
not booked. All positions must agree, and the answer must fit the order (no position we don't
know, no more units than ordered). The outcome is one of:

* ``BOOKED``     — applied as if the lost answer had said success;
* ``NOT_BOOKED`` — only outside RatePAY's ``maximum_processing_offset_in_hours`` after the call
  was planned: a booking younger than that may not show yet. The engine sends it once more;
* ``WAIT``       — "not booked" inside that window: inconclusive for now, asked again later,
  never re-sent;
* ``UNCLEAR``    — anything else (some positions booked and others not, figures that fit
  neither, an unknown ``payment_status``, no window given): a person decides.

The special positions (shipping, voucher) are not read: the shape of ``current_special_items``
is not documented, and a call is all-or-nothing at RatePAY, so they follow their items. A call
of special positions only is ``UNCLEAR``.

PAYMENT_REQUEST and PAYMENT_CONFIRM leave no per-item trace: for them the status API's 200
versus 404, ``payment_status`` and ``shop_order_id`` are all there is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from ratepay_oms.engine.plugins import Reconciled, ReconcileLater
from ratepay_oms.persistence.payment import CANCELLED, DELIVERED, RETURNED
from ratepay_oms.plugins.ratepay.basket import BasketLine, BasketPlan, OrderLedger
from ratepay_oms.ratepay.status_api import PositionFigures, StatusReport

log = logging.getLogger(__name__)

SHIPPING = "shipping"
DISCOUNT = "discount"

SEND_MARGIN = timedelta(minutes=10)
"""Added to a non-zero processing window for the time between planning a call and sending it."""

BOOKED = "booked"
NOT_BOOKED = "not booked"
WAIT = "wait"
UNCLEAR = "unclear"

DECLINED_PAYMENT_STATUSES = frozenset({"DECLINED", "REJECTED"})
ACCEPTED_PAYMENT_STATUSES = frozenset(
    {"ACCEPTED", "AUTHORIZED", "PARTIALLY_DELIVERED", "DELIVERED", "CANCELLED", "CLOSED"}
)
"""``payment_status`` values read as a decided PAYMENT_REQUEST. RatePAY's list is not in the
documentation we could read: these are the sandbox's; any other value is ``UNCLEAR``."""


class StatusNotFinal(ReconcileLater):
    """RatePAY does not show the booking yet, but may still be processing it: ask again later
    (at the latest when the processing window closes); nothing is re-sent."""


@dataclass(frozen=True)
class Verdict:
    """The reading of one status answer against one intent (see the module docstring)."""

    outcome: str
    detail: str
    answer: Any = None
    final_at: datetime | None = None
    """For WAIT: when "not booked" becomes final (the end of the processing window)."""

    def reconciled(self) -> Reconciled | None:
        """The engine's form: booked / not booked, ``None`` for a person, raises for WAIT."""
        if self.outcome == BOOKED:
            return Reconciled(True, self.answer, self.detail)
        if self.outcome == NOT_BOOKED:
            return Reconciled(False, None, self.detail)
        if self.outcome == WAIT:
            raise StatusNotFinal(self.detail, self.final_at)
        log.warning("status lookup does not settle it, a person decides: %s", self.detail)
        return None


def position_key(line: BasketLine) -> str:
    if line.unique_article_number:
        return f"{line.article_number}/{line.unique_article_number}"
    return line.article_number


def planned_now() -> str:
    """The wall-clock time stamp a summary carries as ``planned_at`` (UTC, ISO)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


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
        "ordered": {key: len(ids) for key, ids in units_of.items()},
        "planned_at": planned_now(),
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


# --------------------------------------------------------------------------- verdicts


def _window_end(summary: dict[str, Any], report: StatusReport) -> datetime | None:
    """When a booking of this call must show at the latest; ``None`` when we can't tell.

    ``planned_at`` is when the call was planned; it leaves moments later (after the commit, or
    when a worker's slot frees). When RatePAY reports a processing window at all, a margin of
    ``SEND_MARGIN`` covers that gap; with no window (0 h) the answer is final at once."""
    planned = summary.get("planned_at")
    if not isinstance(planned, str):
        return None  # an intent written before planned_at existed: a person decides
    try:
        planned_at = datetime.fromisoformat(planned)
    except ValueError:
        return None
    if planned_at.tzinfo is None:
        planned_at = planned_at.replace(tzinfo=UTC)
    offset = report.processing_offset_hours
    if offset is None:
        return None
    end = planned_at + timedelta(hours=float(offset))
    return end + SEND_MARGIN if offset > 0 else end


def _window(summary: dict[str, Any], report: StatusReport, now: datetime) -> bool | None:
    """True while a booking of this call might not show yet; ``None`` when we can't tell."""
    end = _window_end(summary, report)
    return None if end is None else now < end


def _not_seen(summary: dict[str, Any], report: StatusReport, now: datetime, what: str) -> Verdict:
    """"Not booked" as far as the answer goes: final only outside the processing window."""
    inside = _window(summary, report, now)
    if inside is None:
        return Verdict(UNCLEAR, f"{what}, but the processing window is unknown")
    if inside:
        return Verdict(
            WAIT,
            f"{what} yet; still inside RatePAY's processing window "
            f"({report.processing_offset_hours} h), asked again later",
            final_at=_window_end(summary, report),
        )
    return Verdict(NOT_BOOKED, f"status API: {what} (outside the processing window)")


def verdict(
    summary: dict[str, Any], report: StatusReport, now: datetime | None = None
) -> Verdict:
    """Read ``report`` against the intent ``summary`` (see the module docstring)."""
    now = now or datetime.now(UTC)
    operation = summary["operation"]
    if operation == "PAYMENT_REQUEST":
        return _payment_request(summary, report, now)
    if operation == "PAYMENT_CONFIRM":
        return _payment_confirm(summary, report, now)
    if not report.found:
        # The PAYMENT_REQUEST was accepted, so RatePAY knows the transaction: a 404 can only
        # mean it does not show it yet (inside the window), else something a person must see.
        if _window(summary, report, now):
            return Verdict(WAIT, "status API: transaction not shown yet (404) inside RatePAY's "
                           "processing window, asked again later",
                           final_at=_window_end(summary, report))
        return Verdict(UNCLEAR, "status API: transaction not found (404) after a booking call")
    return _booking(summary, report, now)


def _payment_request(summary: dict[str, Any], report: StatusReport, now: datetime) -> Verdict:
    if not report.found:
        return _not_seen(summary, report, now, "no status for the transaction (404)")
    status = (report.payment_status or "").upper()
    if status in DECLINED_PAYMENT_STATUSES:
        return Verdict(BOOKED, f"status API: payment_status {status}", {"accepted": False})
    if status in ACCEPTED_PAYMENT_STATUSES:
        return Verdict(BOOKED, f"status API: payment_status {status}", {"accepted": True})
    return Verdict(UNCLEAR, f"status API: payment_status {report.payment_status!r} not known")


def _payment_confirm(summary: dict[str, Any], report: StatusReport, now: datetime) -> Verdict:
    ref = summary.get("order_ref")
    if report.found and ref and report.shop_order_id == ref:
        return Verdict(BOOKED, f"status API: shop_order_id {ref}")
    what = "transaction not found (404)" if not report.found else "shop_order_id not set"
    return _not_seen(summary, report, now, what)


def _figure(field: str, figures: PositionFigures, ordered: int) -> int:
    if field == "delivered":
        return figures.delivered
    if field == "returned":
        return figures.returned
    return figures.cancelled(ordered)


def _booking(summary: dict[str, Any], report: StatusReport, now: datetime) -> Verdict:
    field = summary["field"]
    ordered: dict[str, int] = summary.get("ordered") or {}
    if not ordered:
        return Verdict(UNCLEAR, "intent has no ordered units to compare with (older version)")
    for key, figures in report.positions.items():
        if key not in ordered:
            return Verdict(UNCLEAR, f"status API lists position {key!r} the order doesn't have")
        if figures.open + figures.shipped + figures.returned > ordered[key]:
            return Verdict(UNCLEAR, f"status API lists more units of {key!r} than ordered")
    seen: set[str] = set()
    details: list[str] = []
    for key, figures in summary["positions"].items():
        if key in (SHIPPING, DISCOUNT):
            continue
        if key not in ordered:
            return Verdict(UNCLEAR, f"position {key!r} is not among the ordered ones")
        now_units = _figure(field, report.positions.get(key, PositionFigures()), ordered[key])
        before, added = int(figures["before"]), int(figures["add"])
        if added > 0 and now_units == before + added:
            seen.add(BOOKED)
        elif now_units == before:
            seen.add(NOT_BOOKED)
        else:
            return Verdict(
                UNCLEAR,
                f"status API: {key} {field} {now_units}, expected {before} (not booked) or "
                f"{before + added} (booked)",
            )
        details.append(f"{key} {field} {now_units}")
    if not seen:
        return Verdict(UNCLEAR, "the call named no item position to look up")
    if len(seen) != 1:
        return Verdict(UNCLEAR, "status API: some positions booked, others not: " + ", ".join(
            details))
    if seen == {BOOKED}:
        return Verdict(BOOKED, "status API: " + ", ".join(details))
    return _not_seen(summary, report, now, "not booked: " + ", ".join(details))
