"""What the engine hands back: frozen snapshots, detached from any database session.

Callers (the CLI, an order backend, a test) get plain values they can keep, print or turn into
JSON (``to_json``: money as strings, datetimes as ISO 8601 naive UTC) without holding a
session open or risking a lazy load after it closed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sqlalchemy import Row

    from ratepay_oms.persistence.models import Order, OrderItem, TransitionLog


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


@dataclass(frozen=True)
class ItemView:
    id: int
    line_no: int
    sku: str
    name: str
    unit_price_gross: Decimal
    tax_rate: Decimal
    discount: Decimal
    process: str
    state: str
    state_entered_at: datetime
    retry_event: str | None
    retry_at: datetime | None
    attempts: int
    last_error: str | None
    intent_id: int | None = None
    """Set while the item waits on an open gateway-call intent (see ``Engine.intents``)."""

    @classmethod
    def of(cls, item: OrderItem | Row[Any]) -> ItemView:
        """From an ORM item or a row of ``oms_order_item`` (same attribute names)."""
        return cls(
            id=item.id,
            line_no=item.line_no,
            sku=item.sku,
            name=item.name,
            unit_price_gross=item.unit_price_gross,
            tax_rate=item.tax_rate,
            discount=item.discount,
            process=item.process,
            state=item.state,
            state_entered_at=item.state_entered_at,
            retry_event=item.retry_event,
            retry_at=item.retry_at,
            attempts=item.attempts,
            last_error=item.last_error,
            intent_id=item.intent_id,
        )

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> ItemView:
        """From the values of :data:`ITEM_VIEW_FIELDS`, in that order (a row selected in
        that order): positional, without fifteen attribute lookups per item (a 10,000-unit
        order's view is built after every placing)."""
        return cls(*values)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sku": self.sku,
            "name": self.name,
            "line_no": self.line_no,
            "state": self.state,
            "state_entered_at": _iso(self.state_entered_at),
            "unit_price_gross": str(self.unit_price_gross),
            "tax_rate": str(self.tax_rate),
            "discount": str(self.discount),
            "retry_event": self.retry_event,
            "retry_at": _iso(self.retry_at),
            "attempts": self.attempts,
            "last_error": self.last_error,
            "intent_id": self.intent_id,
        }


ITEM_VIEW_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ItemView))
"""The item columns an :class:`ItemView` holds, in its fields' order."""


@dataclass(frozen=True)
class OrderView:
    order_ref: str
    process: str
    currency: str
    items: tuple[ItemView, ...]
    created_at: datetime
    data: dict[str, Any]
    goods_total: Decimal
    customer_ref: str | None = None
    claimed_by: str | None = None
    claim_expires_at: datetime | None = None

    @classmethod
    def of(cls, order: Order, items: Sequence[OrderItem | Row[Any]]) -> OrderView:
        return cls(
            order_ref=order.order_ref,
            process=order.process,
            currency=order.currency,
            items=tuple(ItemView.of(i) for i in sorted(items, key=lambda i: i.id)),
            created_at=order.created_at,
            data=json.loads(order.data),
            goods_total=order.goods_total,
            customer_ref=order.customer_ref,
            claimed_by=order.claimed_by,
            claim_expires_at=order.claim_expires_at,
        )

    @classmethod
    def of_views(cls, order: Order, items: Sequence[ItemView]) -> OrderView:
        """Like :meth:`of`, from item views already made and ordered by id."""
        return cls(
            order_ref=order.order_ref,
            process=order.process,
            currency=order.currency,
            items=tuple(items),
            created_at=order.created_at,
            data=json.loads(order.data),
            goods_total=order.goods_total,
            customer_ref=order.customer_ref,
            claimed_by=order.claimed_by,
            claim_expires_at=order.claim_expires_at,
        )

    def states(self) -> dict[str, int]:
        """How many items sit in each state."""
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.state] = counts.get(item.state, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "order_ref": self.order_ref,
            "process": self.process,
            "currency": self.currency,
            "customer_ref": self.customer_ref,
            "goods_total": str(self.goods_total),
            "created_at": _iso(self.created_at),
            "claimed_by": self.claimed_by,
            "claim_expires_at": _iso(self.claim_expires_at),
            "items": [i.to_json() for i in self.items],
            "data": self.data,
        }


@dataclass(frozen=True)
class HistoryEntry:
    item_id: int
    sku: str
    from_state: str | None
    to_state: str
    event: str | None
    created_at: datetime
    forced: bool = False
    """A person forced this move (``order move``); ``actor`` and ``reason`` say who and why."""
    actor: str | None = None
    reason: str | None = None
    data: dict[str, Any] | None = None
    """What a person gave with the manual event that made this move (invoice id, …)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "sku": self.sku,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "event": self.event,
            "created_at": _iso(self.created_at),
            "forced": self.forced,
            "actor": self.actor,
            "reason": self.reason,
            "data": self.data,
        }


@dataclass(frozen=True)
class TransitionLogEntry:
    item_id: int
    process: str
    event: str | None
    source_state: str
    target_state: str | None
    command: str | None
    condition: str | None
    is_error: bool
    error_message: str | None
    hostname: str | None
    argv: str | None
    created_at: datetime
    forced: bool = False
    actor: str | None = None
    reason: str | None = None

    @classmethod
    def of(cls, row: TransitionLog) -> TransitionLogEntry:
        return cls(
            item_id=row.item_id,
            process=row.process,
            event=row.event,
            source_state=row.source_state,
            target_state=row.target_state,
            command=row.command,
            condition=row.condition,
            is_error=bool(row.is_error),
            error_message=row.error_message,
            hostname=row.hostname,
            argv=row.argv,
            created_at=row.created_at,
            forced=bool(row.forced),
            actor=row.actor,
            reason=row.reason,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "process": self.process,
            "event": self.event,
            "source_state": self.source_state,
            "target_state": self.target_state,
            "command": self.command,
            "condition": self.condition,
            "is_error": self.is_error,
            "error_message": self.error_message,
            "hostname": self.hostname,
            "argv": self.argv,
            "created_at": _iso(self.created_at),
            "forced": self.forced,
            "actor": self.actor,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class TriggerResult:
    """``moved`` lists every step, including the on-enter cascade that followed (one item can
    appear several times, in order); ``stayed`` the items the event left where they were."""

    event: str
    moved: list[tuple[int, str, str]] = field(default_factory=list)
    stayed: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    held: list[tuple[int, str]] = field(default_factory=list)
    """(item id, why): items whose booking waits for another booking of the order that is in
    doubt; the tick fires the event for them once that one is settled."""

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "moved": [{"item_id": i, "from": s, "to": t} for i, s, t in self.moved],
            "stayed": list(self.stayed),
            "held": [{"item_id": i, "why": why} for i, why in self.held],
            "errors": list(self.errors),
        }


@dataclass(frozen=True)
class TickResult:
    items_moved: int = 0
    commands_run: int = 0
    errors: int = 0
    retries_scheduled: int = 0
    timeouts_fired: int = 0
    orders_seen: int = 0
    duration_s: float = 0.0
    error_messages: tuple[str, ...] = ()
    notifications_delivered: int = 0
    notifications_failed: int = 0
    """Delivery attempts that failed this tick (retried later, or dead)."""

    def summary(self) -> str:
        notes = ""
        if self.notifications_delivered or self.notifications_failed:
            notes = (
                f", {self.notifications_delivered} notifications delivered, "
                f"{self.notifications_failed} failed"
            )
        return (
            f"tick: {self.items_moved} items moved, {self.commands_run} commands run, "
            f"{self.errors} errors, {self.retries_scheduled} retries scheduled, "
            f"{self.timeouts_fired} timeouts fired, {self.orders_seen} orders seen"
            f"{notes} in {self.duration_s:.2f} s"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "items_moved": self.items_moved,
            "commands_run": self.commands_run,
            "errors": self.errors,
            "retries_scheduled": self.retries_scheduled,
            "timeouts_fired": self.timeouts_fired,
            "orders_seen": self.orders_seen,
            "duration_s": round(self.duration_s, 3),
            "error_messages": list(self.error_messages),
            "notifications_delivered": self.notifications_delivered,
            "notifications_failed": self.notifications_failed,
        }
