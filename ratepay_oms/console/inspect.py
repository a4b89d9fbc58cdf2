"""Everything an operator needs about one order on one screen (``order show``).

Items and where they stand, the payment (method, RatePAY transaction id, short id, descriptor),
what was delivered, cancelled and returned, what the tick will do next (armed timeouts, due
retries) and the last gateway calls with their result codes.

The payment comes from ``ratepay_payment`` (when the RatePAY plugin wrote one); the transaction
id falls back to the API log. Delivered / cancelled / returned amounts are what RatePAY
confirmed per item (successful ``ratepay_item_outcome`` rows), not what a person clicked; on a
database without those tables they come from the items' history instead: an item counts once it
took a transition guarded by the matching RatePAY condition (``SETTLED_BY``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, cast

from sqlalchemy import Table, inspect, select
from sqlalchemy.orm import Session

from ratepay_oms.console._session import ConsoleError, session_of, utc_now
from ratepay_oms.console.apilog import api_calls, mask_text
from ratepay_oms.persistence.models import EventTimeout, Order, OrderItem, StateHistory
from ratepay_oms.persistence.payment import (
    CANCELLATION,
    DELIVERY,
    RETURN,
    RatepayAdjustment,
    RatepayItemOutcome,
    RatepayPayment,
)
from ratepay_oms.process.model import ProcessDefinition
from ratepay_oms.ratepay.codes import METHOD_LOCKING_REASONS, reason_text

log = logging.getLogger(__name__)

_ITEMS = cast(Table, OrderItem.__table__)
_TIMEOUTS = cast(Table, EventTimeout.__table__)

CENT = Decimal("0.01")
DEFAULT_CALLS = 10

SETTLED_BY: Mapping[str, str] = {
    "IsDeliveryConfirmed": "delivered",
    "IsCancellationConfirmed": "cancelled",
    "IsRefunded": "returned",
    "IsReturned": "returned",
}
"""Condition name (without the ``Ratepay/`` prefix) → amount bucket it settles."""

_ACTION_BUCKET = {DELIVERY: "delivered", CANCELLATION: "cancelled", RETURN: "returned"}


class OrderNotFound(ConsoleError):
    pass


def _money(value: Decimal) -> str:
    return str(value.quantize(CENT, rounding=ROUND_HALF_UP))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _list_intents(session: Session, order_id: int) -> list[Any]:
    from ratepay_oms.engine.intents import list_intents

    return list_intents(session, order_id=order_id, open_only=True)


def order_detail(
    source: Any,
    ref: str,
    *,
    now: datetime | None = None,
    definitions: Mapping[str, ProcessDefinition] | None = None,
    calls: int = DEFAULT_CALLS,
) -> dict[str, Any]:
    """The order ``ref`` as a JSON-able dict (shape in ``docs/console.md``).

    ``source``: an ``Engine`` (its definitions are used when ``definitions`` is not given), a
    ``sessionmaker`` or a ``Session``. Raises ``OrderNotFound`` for an unknown ref.
    """
    now = now or utc_now()
    if definitions is None and hasattr(source, "definitions"):
        definitions = source.definitions()
    definitions = definitions or {}
    with session_of(source) as session:
        order = session.scalar(select(Order).where(Order.order_ref == ref))
        if order is None:
            raise OrderNotFound(f"no order {ref!r}")
        # Rows, not ORM objects, and no id lists: a 10,000-unit order is read in a few
        # queries (its history only when the outcome table is missing, see below).
        items = session.execute(
            select(_ITEMS).where(_ITEMS.c.order_id == order.id).order_by(_ITEMS.c.id)
        ).all()
        timeouts = session.execute(
            select(_TIMEOUTS)
            .where(
                _TIMEOUTS.c.item_id.in_(
                    select(OrderItem.id).where(OrderItem.order_id == order.id)
                )
            )
            .order_by(_TIMEOUTS.c.due_at, _TIMEOUTS.c.item_id)
        ).all()
        payment = _payment_row(session, order)
        settled = _outcome_settled(session, order)
        if settled is None:
            history = list(
                session.execute(
                    select(
                        StateHistory.item_id,
                        StateHistory.from_state,
                        StateHistory.to_state,
                        StateHistory.event,
                    )
                    .where(StateHistory.order_id == order.id)
                    .order_by(StateHistory.id)
                )
            )
            settled = _settled_items(items, history, definitions)
        detail = _detail(order, items, settled, timeouts, payment, now, definitions)
        adjustments = _adjustments(session, order)
        detail["adjustments"] = adjustments
        booked = [a for a in adjustments if a["status"] == "booked"]
        detail["amounts"]["credited"] = _money(
            sum((Decimal(a["amount"]) for a in booked if a["kind"] == "credit"), Decimal("0"))
        )
        detail["amounts"]["debited"] = _money(
            sum((Decimal(a["amount"]) for a in booked if a["kind"] == "debit"), Decimal("0"))
        )
        detail["intents"] = [
            {**v.to_json(), "last_error": mask_text(v.last_error)}
            for v in _list_intents(session, order.id)
        ]
    gateway = [c.to_json() for c in api_calls(source, order_ref=ref, limit=calls)]
    detail["gateway_calls"] = gateway
    if detail["payment"]["transaction_id"] is None:
        detail["payment"]["transaction_id"] = next(
            (c["transaction_id"] for c in gateway if c["transaction_id"]), None
        )
    return detail


def _detail(
    order: Order,
    items: Sequence[Any],
    settled: dict[int, set[str]],
    timeouts: Sequence[Any],
    payment: dict[str, Any] | None,
    now: datetime,
    definitions: Mapping[str, ProcessDefinition],
) -> dict[str, Any]:
    data = _order_data(order)
    amounts = {
        "ordered": Decimal("0"),
        "delivered": Decimal("0"),
        "cancelled": Decimal("0"),
        "returned": Decimal("0"),
    }
    item_rows = []
    # Units of one line share price, discount and (mostly) state: format those once.
    prices: dict[tuple[Decimal, Decimal], tuple[Decimal, str, str, str]] = {}
    manual: dict[tuple[str, str], tuple[str, ...]] = {}
    for item in items:
        discount = item.discount or Decimal("0")
        price = prices.get((item.unit_price_gross, discount))
        if price is None:
            total = item.unit_price_gross + discount
            price = prices[(item.unit_price_gross, discount)] = (
                total, _money(item.unit_price_gross), _money(discount), _money(total)
            )
        amount = price[0]
        amounts["ordered"] += amount
        for bucket in settled.get(item.id, ()):
            amounts[bucket] += amount
        events = manual.get((item.process, item.state))
        if events is None:
            definition = definitions.get(item.process)
            events = manual[(item.process, item.state)] = (
                definition.manual_events(item.state) if definition else ()
            )
        item_rows.append(
            {
                "id": item.id,
                "sku": item.sku,
                "name": item.name,
                "line_no": item.line_no,
                "process": item.process,
                "state": item.state,
                "state_entered_at": _iso(item.state_entered_at),
                "unit_price_gross": price[1],
                "discount": price[2],
                "amount": price[3],
                "settled": sorted(settled.get(item.id, ())),
                "manual_events": list(events),
                "retry_event": item.retry_event,
                "retry_at": _iso(item.retry_at),
                "attempts": item.attempts,
                "last_error": mask_text(item.last_error),
            }
        )
    shipping = data.get("shipping") or {}
    payment_out = {
        "method": (data.get("payment") or {}).get("method"),
        "transaction_id": None,
        "short_id": None,
        "descriptor": None,
    }
    if payment:
        for key, value in payment.items():
            if value is not None:
                payment_out[key] = value
    bank = ((data.get("customer") or {}).get("bank_account")) or {}
    if bank.get("mandate_reference"):
        payment_out["mandate_reference"] = bank["mandate_reference"]
    lock = method_lock(payment_out.get("reason_code"), payment_out.get("method"))
    if lock:
        payment_out["method_locked"] = lock
    lease = None
    if order.claimed_by is not None:
        expires = order.claim_expires_at
        lease = {
            "claimed_by": order.claimed_by,
            "claim_expires_at": _iso(expires),
            "expired": expires is None or expires <= now,
        }
    return {
        "order_ref": order.order_ref,
        "process": order.process,
        "currency": order.currency,
        "created_at": _iso(order.created_at),
        "customer_ref": order.customer_ref,
        "goods_total": _money(order.goods_total),
        "shipping": shipping.get("unit_price_gross") if shipping else None,
        "lease": lease,
        "states": dict(sorted(Counter(i.state for i in items).items())),
        "items": item_rows,
        "payment": payment_out,
        "amounts": {k: _money(v) for k, v in amounts.items()}
        | {"open": _money(amounts["ordered"] - amounts["delivered"] - amounts["cancelled"])},
        "timeouts": [
            {
                "item_id": t.item_id,
                "state": t.state,
                "event": t.event,
                "due_at": _iso(t.due_at),
                "overdue": t.due_at <= now,
            }
            for t in timeouts
        ],
        "retries": [
            {
                "item_id": i.id,
                "state": i.state,
                "event": i.retry_event,
                "retry_at": _iso(i.retry_at),
                "attempts": i.attempts,
                "due": i.retry_at <= now,
                "last_error": mask_text(i.last_error),
            }
            for i in items
            if i.retry_at is not None
        ],
    }


def method_lock(reason_code: object, method: object) -> str | None:
    """Why RatePAY's decline means "offer this customer another payment method", or None.

    RatePAY's shop plugins hide the method for the customer after reasons 703 / 720 / 721
    (reference §6.3, §7); the console says so instead of suggesting a retry."""
    try:
        code = int(str(reason_code))
    except ValueError:
        return None
    if code not in METHOD_LOCKING_REASONS:
        return None
    return (
        f"RatePAY reason {code} ({reason_text(code)}): {method or 'this method'} is locked for "
        "this customer; offer another payment method"
    )


def _order_data(order: Order) -> dict[str, Any]:
    try:
        data = json.loads(order.data)
    except (TypeError, ValueError):
        log.warning("order %s has unreadable data", order.order_ref)
        return {}
    return data if isinstance(data, dict) else {}


def _settled_items(
    items: Sequence[Any], history: list[Any], definitions: Mapping[str, ProcessDefinition]
) -> dict[int, set[str]]:
    """Which amount buckets each item reached, from the transitions its history took."""
    process_of = {i.id: i.process for i in items}
    settled: dict[int, set[str]] = {}
    for item_id, source, target, event in history:
        definition = definitions.get(process_of.get(item_id, ""))
        if definition is None or source is None:
            continue
        for t in definition.transitions:
            if t.source == source and t.target == target and t.event == event and t.condition:
                bucket = SETTLED_BY.get(t.condition.rsplit("/", 1)[-1])
                if bucket:
                    settled.setdefault(item_id, set()).add(bucket)
    return settled


def _has_table(session: Session, name: str) -> bool:
    try:
        return bool(inspect(session.connection()).has_table(name))
    except Exception:  # pragma: no cover - reflection trouble must not hide the order
        log.exception("cannot look for table %s", name)
        return False


def _payment_row(session: Session, order: Order) -> dict[str, Any] | None:
    """The RatePAY payment of the order (``None`` before the first call or without RatePAY)."""
    if not _has_table(session, RatepayPayment.__tablename__):
        return None
    row = session.scalar(select(RatepayPayment).where(RatepayPayment.order_id == order.id))
    if row is None:
        return None
    return {
        "method": row.method,
        "transaction_id": row.transaction_id,
        "short_id": row.transaction_short_id,
        "descriptor": row.descriptor,
        "result_code": row.result_code,
        "reason_code": row.reason_code,
        "customer_message": row.customer_message,
        "shipping_status": row.shipping_status,
        "discount_status": row.discount_status,
        "profile": row.profile,
        "voucher_rule": row.voucher_rule,
    }


def _adjustments(session: Session, order: Order) -> list[dict[str, Any]]:
    """Goodwill credits and debits of the order (``[]`` without the table)."""
    if not _has_table(session, RatepayAdjustment.__tablename__):
        return []
    rows = session.scalars(
        select(RatepayAdjustment)
        .where(RatepayAdjustment.order_id == order.id)
        .order_by(RatepayAdjustment.id)
    )
    return [
        {
            "id": row.id,
            "kind": row.kind,
            "amount": _money(row.amount),
            "tax_rate": str(row.tax_rate),
            "reason": row.reason,
            "status": row.status,
            "result_code": row.result_code,
            "reason_code": row.reason_code,
            "message": mask_text(row.message),
            "created_at": _iso(row.created_at),
            "settled_at": _iso(row.settled_at),
        }
        for row in rows
    ]


def _outcome_settled(session: Session, order: Order) -> dict[int, set[str]] | None:
    """Buckets per item from RatePAY's confirmed answers (``None`` without the table)."""
    if not _has_table(session, RatepayItemOutcome.__tablename__):
        return None
    rows = session.execute(
        select(RatepayItemOutcome.item_id, RatepayItemOutcome.action).where(
            RatepayItemOutcome.order_id == order.id, RatepayItemOutcome.success.is_(True)
        )
    )
    settled: dict[int, set[str]] = {}
    for item_id, action in rows:
        bucket = _ACTION_BUCKET.get(action)
        if bucket:
            settled.setdefault(item_id, set()).add(bucket)
    return settled


def order_state_counts(source: Any, ref: str, process: str | None = None) -> dict[str, int]:
    """``{state: items}`` of order ``ref`` (only its items on ``process`` when given): the
    highlight of ``process draw --order``. Raises ``OrderNotFound``, or ``ConsoleError`` when
    none of the order's items run on ``process``."""
    with session_of(source) as session:
        order = session.scalar(select(Order).where(Order.order_ref == ref))
        if order is None:
            raise OrderNotFound(f"no order {ref!r}")
        rows = session.execute(
            select(OrderItem.process, OrderItem.state).where(OrderItem.order_id == order.id)
        ).all()
    counts = Counter(state for proc, state in rows if process is None or proc == process)
    if not counts:
        running = ", ".join(sorted({proc for proc, _ in rows})) or "no process"
        raise ConsoleError(f"order {ref!r} has no items on {process} (its items run on {running})")
    return dict(counts)


ITEMS_TABLE_LIMIT = 100
"""Orders with more items than this are shown as a summary by SKU and state (``order show``,
``order place``); ``--items`` prints every item. A hundred rows still fit a scrollback and
cover every ordinary basket; a wholesale order of thousands of units does not."""


def item_summary(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Items grouped by (SKU, state), in order of first appearance (items come by id, so by
    order line): how many, their amount, how many wait for a retry or carry an error, and the
    first such error. ``items`` are ``order_detail``'s item dicts or ``ItemView.to_json()``
    dicts (``amount`` is computed from price and discount when absent)."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for item in items:
        key = (item["sku"], item["state"])
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "sku": item["sku"], "name": item.get("name"), "state": item["state"],
                "items": 0, "amount": Decimal("0"), "first_item": item["id"],
                "with_error": 0, "error": None,
            }
        group["items"] += 1
        amount = item.get("amount")
        if amount is None:
            amount = Decimal(item["unit_price_gross"]) + Decimal(item.get("discount") or 0)
        group["amount"] += Decimal(amount)
        if item.get("last_error") or item.get("retry_at"):
            group["with_error"] += 1
            if group["error"] is None:
                group["error"] = item.get("last_error") or f"retry at {item.get('retry_at')}"
    return [{**g, "amount": _money(g["amount"])} for g in groups.values()]


def merge_order_json(base: dict[str, Any], detail: Mapping[str, Any]) -> dict[str, Any]:
    """``order show --json``: the engine's ``OrderView.to_json()`` keys stay as they are; the
    detail adds its keys beside them and its extra per-item keys to each item."""
    merged = dict(base)
    for key, value in detail.items():
        merged.setdefault(key, value)
    extra = {item["id"]: item for item in detail.get("items", [])}
    merged["items"] = [
        {**{k: v for k, v in extra.get(item.get("id"), {}).items() if k not in item}, **item}
        for item in base.get("items", [])
    ]
    return merged
