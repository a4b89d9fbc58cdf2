"""The OMS tables: orders, one row per item unit, and the audit trail of every move.

State lives per item unit (quantity 3 → 3 rows), as in Spryker, so a partial shipment or
cancellation is just some items taking an event and others not. Everything the tick needs to
find work cheaply is indexed: (process, state) for on-enter and polled states, ``retry_at``
for retries, ``oms_event_timeout.due_at`` for timeouts.

All datetimes are naive UTC. On MariaDB they are stored with microseconds (``DATETIME(6)``)
so that a retry due "now + 30 s" and the ordering of audit rows survive the round trip.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    Boolean,
    ColumnElement,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    false,
    literal,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column, relationship

from ratepay_oms.persistence.api_log import ApiLogEntry
from ratepay_oms.persistence.base import MONEY, Base

__all__ = [
    "ApiLogEntry",
    "EventTimeout",
    "Intent",
    "Order",
    "OrderItem",
    "OutboxEntry",
    "StateHistory",
    "TransitionLog",
]

UTC_DATETIME = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
"""Naive UTC timestamp with microseconds on every dialect."""

LONG_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
"""Order documents can outgrow MariaDB's 64 KiB ``TEXT``."""

TAX_RATE = Numeric(5, 2)
NAME = String(100)
"""Process, state, event and plugin names."""


class Order(Base):
    """One placed order; ``data`` keeps the full order document (``OrderInput.to_dict()``) so
    commands can build gateway requests without a second source of truth.

    ``claimed_by``/``claim_expires_at`` are the per-order lease: one worker works on one order
    at a time, so a by-order command is never split between workers nor run twice.
    """

    __tablename__ = "oms_order"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_ref: Mapped[str] = mapped_column(String(100), nullable=False)
    process: Mapped[str] = mapped_column(NAME, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    customer_ref: Mapped[str | None] = mapped_column(String(100))
    data: Mapped[str] = mapped_column(LONG_TEXT, nullable=False)
    goods_total: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)

    items: Mapped[list[OrderItem]] = relationship(back_populates="order", order_by="OrderItem.id")

    __table_args__ = (UniqueConstraint("order_ref", name="uq_oms_order_order_ref"),)

    def __repr__(self) -> str:
        return f"<Order {self.order_ref} {self.process}>"


class OrderItem(Base):
    """One unit of one order line, with its own state.

    ``retry_*`` and ``attempts`` describe a failed event waiting for its next try: the tick
    re-fires ``retry_event`` once ``retry_at`` has passed, if the item still sits in the state
    the event failed in. A successful event clears them.
    """

    __tablename__ = "oms_order_item"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(
        ForeignKey("oms_order.id", ondelete="CASCADE"), nullable=False
    )
    line_no: Mapped[int] = mapped_column(Integer, nullable=False)
    sku: Mapped[str] = mapped_column(String(100), nullable=False)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    unit_price_gross: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    tax_rate: Mapped[Decimal] = mapped_column(TAX_RATE, nullable=False)
    discount: Mapped[Decimal] = mapped_column(MONEY, nullable=False, default=Decimal("0.00"))
    """Per unit, zero or negative."""
    process: Mapped[str] = mapped_column(NAME, nullable=False)
    state: Mapped[str] = mapped_column(NAME, nullable=False)
    state_entered_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)
    retry_event: Mapped[str | None] = mapped_column(NAME)
    retry_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    intent_id: Mapped[int | None] = mapped_column(Integer)
    """The open gateway-call intent this item waits on: no event fires for it until settled."""

    order: Mapped[Order] = relationship(back_populates="items")

    __table_args__ = (
        Index("ix_oms_order_item_process_state", "process", "state"),
        Index("ix_oms_order_item_retry_at", "retry_at"),
        Index("ix_oms_order_item_order_id", "order_id"),
        Index("ix_oms_order_item_intent_id", "intent_id"),
    )

    def __repr__(self) -> str:
        return f"<OrderItem {self.id} {self.sku} {self.state}>"


class StateHistory(Base):
    """One row per state an item entered (``from_state`` is ``None`` for the initial state)."""

    __tablename__ = "oms_state_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(
        ForeignKey("oms_order_item.id", ondelete="CASCADE"), nullable=False
    )
    order_id: Mapped[int] = mapped_column(Integer, nullable=False)
    from_state: Mapped[str | None] = mapped_column(NAME)
    to_state: Mapped[str] = mapped_column(NAME, nullable=False)
    event: Mapped[str | None] = mapped_column(NAME)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)
    forced: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false()
    )
    """A person forced this move (``order move``): no event, no command; ``actor`` and
    ``reason`` say who and why."""
    actor: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(Text)
    data: Mapped[str | None] = mapped_column(Text)
    """JSON object a person gave with the manual event that moved the item (invoice id,
    tracking ids, …); ``None`` for every other move."""

    __table_args__ = (
        Index("ix_oms_state_history_item_id", "item_id"),
        Index("ix_oms_state_history_order_id", "order_id"),
    )


class TransitionLog(Base):
    """What the engine did per item and event, including failures (``is_error``).

    ``target_state`` is ``None`` when nothing moved (a failed command, or no condition held
    after a command ran). ``hostname``/``argv`` say which machine and program did it, as
    Spryker's log does, so an operator can find the cron or console run behind a row.
    """

    __tablename__ = "oms_transition_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(
        ForeignKey("oms_order_item.id", ondelete="CASCADE"), nullable=False
    )
    order_id: Mapped[int] = mapped_column(Integer, nullable=False)
    process: Mapped[str] = mapped_column(NAME, nullable=False)
    event: Mapped[str | None] = mapped_column(NAME)
    source_state: Mapped[str] = mapped_column(NAME, nullable=False)
    target_state: Mapped[str | None] = mapped_column(NAME)
    command: Mapped[str | None] = mapped_column(NAME)
    condition: Mapped[str | None] = mapped_column(NAME)
    is_error: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    error_message: Mapped[str | None] = mapped_column(Text)
    hostname: Mapped[str | None] = mapped_column(String(255))
    argv: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)
    forced: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false()
    )
    """A forced move (see ``StateHistory.forced``)."""
    actor: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_oms_transition_log_order_id", "order_id"),
        Index("ix_oms_transition_log_item_id", "item_id"),
    )


class EventTimeout(Base):
    """A timeout event armed when its item entered ``state``; dropped when the item leaves."""

    __tablename__ = "oms_event_timeout"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(
        ForeignKey("oms_order_item.id", ondelete="CASCADE"), nullable=False
    )
    state: Mapped[str] = mapped_column(NAME, nullable=False)
    event: Mapped[str] = mapped_column(NAME, nullable=False)
    due_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)

    __table_args__ = (
        UniqueConstraint("item_id", "event", name="uq_oms_event_timeout_item_id_event"),
        Index("ix_oms_event_timeout_due_at", "due_at"),
    )


# Intent statuses.
INTENT_PENDING = "pending"
"""Committed before the call; the answer is not applied yet (in flight, lost, or crashed)."""
INTENT_UNKNOWN = "unknown"
"""Nobody can tell whether the call was booked (no status source): a person decides."""
INTENT_SETTLED = "settled"
INTENT_OPEN_STATUSES = (INTENT_PENDING, INTENT_UNKNOWN)


def intent_open(status: ColumnElement[str]) -> ColumnElement[bool]:
    """``status IN ('pending', 'unknown')`` with one plain parameter per status.

    ``status.in_(INTENT_OPEN_STATUSES)`` would make an *expanding* parameter: SQLAlchemy then
    renders the statement's SQL anew on every execution (a regular expression over the whole
    text), which the engine's compare-and-set and lock paid on every gateway call."""
    return status.in_([literal(s, String()) for s in INTENT_OPEN_STATUSES])


class Intent(Base):
    """A call with effects outside the database (a RatePAY booking), written *before* the call.

    It commits in a transaction of its own before anything is sent, and is settled in the same
    transaction that applies the answer and moves the items. An intent still open after its
    worker is gone (crash, lost answer) is reconciled by asking the other side what it booked,
    never by sending again. ``summary`` is the command's JSON description of the call
    (operation, positions, amounts); ``item_ids`` the JSON list of the items it covers.
    ``resolution`` says how it was settled: ``answered``, ``not_sent``, ``reconciled_booked``,
    ``reconciled_not_booked``, ``resolved_booked`` / ``resolved_not_booked`` (by a person).
    """

    __tablename__ = "oms_intent"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(Integer, nullable=False)
    process: Mapped[str] = mapped_column(NAME, nullable=False)
    state: Mapped[str] = mapped_column(NAME, nullable=False)
    event: Mapped[str | None] = mapped_column(NAME)
    command: Mapped[str] = mapped_column(NAME, nullable=False)
    item_ids: Mapped[str] = mapped_column(LONG_TEXT, nullable=False)
    summary: Mapped[str] = mapped_column(LONG_TEXT, nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    resolution: Mapped[str | None] = mapped_column(String(40))
    worker: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    """Reconciliation attempts so far."""
    last_error: Mapped[str | None] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)
    reconcile_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    settled_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)

    __table_args__ = (
        Index("ix_oms_intent_status", "status"),
        Index("ix_oms_intent_order_id", "order_id"),
    )

    def __repr__(self) -> str:
        return f"<Intent {self.id} {self.command} {self.status}>"


# Outbox statuses.
OUTBOX_PENDING = "pending"
"""Waiting for its (next) delivery attempt."""
OUTBOX_DELIVERED = "delivered"
OUTBOX_DEAD = "dead"
"""Gave up after the configured number of attempts: ``outbox retry`` puts it back."""
OUTBOX_STATUSES = (OUTBOX_PENDING, OUTBOX_DELIVERED, OUTBOX_DEAD)


class OutboxEntry(Base):
    """A state-change notification, written in the transaction that moved the item.

    The transactional outbox: the row exists exactly when the move committed, so a crash can
    neither lose a notification nor announce a move that was rolled back. Delivery
    (``ratepay_oms.engine.outbox``) leases rows (``claimed_by``/``claim_expires_at``), commits,
    POSTs outside any transaction and records the result in another one; a worker that dies
    mid-delivery leaves a lease that expires, and the row is sent again (at least once).
    ``idempotency_key`` is fixed before the first attempt leaves and sent with every attempt,
    so a receiver drops the repeats. ``created_at`` is the moment of the move.
    """

    __tablename__ = "oms_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(Integer, nullable=False)
    item_id: Mapped[int] = mapped_column(Integer, nullable=False)
    process: Mapped[str] = mapped_column(NAME, nullable=False)
    from_state: Mapped[str | None] = mapped_column(NAME)
    to_state: Mapped[str] = mapped_column(NAME, nullable=False)
    event: Mapped[str | None] = mapped_column(NAME)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(64))
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_http_status: Mapped[int | None] = mapped_column(Integer)
    delivered_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)

    __table_args__ = (
        Index("ix_oms_outbox_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_oms_outbox_order_id", "order_id"),
        {"sqlite_autoincrement": True},
    )

    def __repr__(self) -> str:
        return f"<OutboxEntry {self.id} item {self.item_id} → {self.to_state} {self.status}>"
