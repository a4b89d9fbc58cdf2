"""The RatePAY payment tables: one payment row per order, one outcome row per item and call.

Spryker keeps one ``result_code`` per order and its conditions read it, so after a successful
partial refund a failed one still "passes". Here every RatePAY command writes one
``ratepay_item_outcome`` row per item it handled, through the engine's session, so the row
commits together with the state change; the conditions read the newest row of *that item* for
*that action*. The same rows are our own ledger of what was delivered, cancelled and returned
(``action`` + ``success``), from which the shipping and voucher rules are computed.

The special positions (shipping costs, order discount) are not items, so their progress is kept
on the payment row: ``open`` → ``delivered`` → ``returned``, or ``open`` → ``cancelled``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, Numeric, String, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from ratepay_oms.persistence.base import MONEY, Base

__all__ = [
    "ACTIONS",
    "ADJUSTMENT_KINDS",
    "POSITION_STATUSES",
    "RatepayAdjustment",
    "RatepayItemOutcome",
    "RatepayPayment",
    "RatepayProfile",
]

_TIMESTAMP = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
_LONG_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

# What a command did to an item (the value of ``RatepayItemOutcome.action``).
PAYMENT_REQUEST = "payment_request"
PAYMENT_CONFIRM = "payment_confirm"
DELIVERY = "delivery"
CANCELLATION = "cancellation"
RETURN = "return"
ACTIONS = (PAYMENT_REQUEST, PAYMENT_CONFIRM, DELIVERY, CANCELLATION, RETURN)

# Progress of a special position (shipping / discount) at RatePAY.
OPEN = "open"
DELIVERED = "delivered"
CANCELLED = "cancelled"
RETURNED = "returned"
POSITION_STATUSES = (OPEN, DELIVERED, CANCELLED, RETURNED)


class RatepayPayment(Base):
    """What RatePAY told us about an order's payment, kept with the order.

    ``customer_message`` is RatePAY's text for the shopper (shown by the shop after a decline);
    ``installment_plan`` is the CALCULATION_REQUEST result as JSON (money as strings).
    """

    __tablename__ = "ratepay_payment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(
        ForeignKey("oms_order.id", ondelete="CASCADE"), nullable=False, unique=True
    )
    method: Mapped[str] = mapped_column(String(20), nullable=False)
    transaction_id: Mapped[str | None] = mapped_column(String(255))
    transaction_short_id: Mapped[str | None] = mapped_column(String(255))
    descriptor: Mapped[str | None] = mapped_column(String(255))
    result_code: Mapped[str | None] = mapped_column(String(20))
    """Result code of the last PAYMENT_REQUEST (402 accepted, 401 declined, 150 failed)."""
    reason_code: Mapped[str | None] = mapped_column(String(20))
    customer_message: Mapped[str | None] = mapped_column(Text)
    installment_plan: Mapped[str | None] = mapped_column(Text)
    profile: Mapped[str | None] = mapped_column(String(40))
    """The configured profile name (``[ratepay.profiles.<NAME>]``) the transaction was opened
    with; every follow-up goes out with the same credentials. ``None``: the default profile."""
    voucher_rule: Mapped[str | None] = mapped_column(String(20))
    """``last_delivery`` or ``prorata`` (setting ``VOUCHER_RULE``), fixed at the PAYMENT_REQUEST
    so a changed setting never splits one order's voucher two ways; ``None``: last_delivery."""
    shipping_status: Mapped[str] = mapped_column(String(20), nullable=False, default=OPEN)
    discount_status: Mapped[str] = mapped_column(String(20), nullable=False, default=OPEN)
    created_at: Mapped[datetime] = mapped_column(_TIMESTAMP, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(_TIMESTAMP, nullable=False)

    def __repr__(self) -> str:
        return f"<RatepayPayment order={self.order_id} {self.method} {self.transaction_id}>"


class RatepayItemOutcome(Base):
    """The answer one RatePAY call gave for one item (one row per item per call)."""

    __tablename__ = "ratepay_item_outcome"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(
        ForeignKey("oms_order_item.id", ondelete="CASCADE"), nullable=False
    )
    order_id: Mapped[int] = mapped_column(Integer, nullable=False)
    action: Mapped[str] = mapped_column(String(20), nullable=False)
    success: Mapped[bool] = mapped_column(Boolean, nullable=False)
    operation: Mapped[str] = mapped_column(String(40), nullable=False)
    subtype: Mapped[str | None] = mapped_column(String(40))
    result_code: Mapped[str | None] = mapped_column(String(20))
    reason_code: Mapped[str | None] = mapped_column(String(20))
    message: Mapped[str | None] = mapped_column(Text)
    """RatePAY's result/reason text, or why we did not call at all."""
    transaction_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(_TIMESTAMP, nullable=False)

    __table_args__ = (
        Index("ix_ratepay_item_outcome_item_id_action", "item_id", "action"),
        Index("ix_ratepay_item_outcome_order_id", "order_id"),
    )


# Goodwill credits and debits (``RatepayAdjustment.kind`` / ``.status``).
CREDIT = "credit"
DEBIT = "debit"
ADJUSTMENT_KINDS = (CREDIT, DEBIT)
ADJ_PENDING = "pending"
"""Asked for; the PAYMENT_CHANGE is planned or in flight (its intent says which)."""
ADJ_BOOKED = "booked"
ADJ_REFUSED = "refused"


class RatepayAdjustment(Base):
    """One goodwill credit (the shopper owes less) or debit (more) on an order, booked at
    RatePAY as its own PAYMENT_CHANGE credit after a delivery. ``amount`` is positive for both
    kinds; the sign on the wire follows ``kind``. Written only by the credit command."""

    __tablename__ = "ratepay_adjustment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(
        ForeignKey("oms_order.id", ondelete="CASCADE"), nullable=False
    )
    request_id: Mapped[str] = mapped_column(String(40), nullable=False, unique=True)
    """The asker's id of this credit/debit: a retry of the same request finds its row instead
    of booking a second one."""
    kind: Mapped[str] = mapped_column(String(10), nullable=False)
    amount: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    tax_rate: Mapped[Decimal] = mapped_column(Numeric(5, 2), nullable=False)
    reason: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    result_code: Mapped[str | None] = mapped_column(String(20))
    reason_code: Mapped[str | None] = mapped_column(String(20))
    message: Mapped[str | None] = mapped_column(Text)
    transaction_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(_TIMESTAMP, nullable=False)
    settled_at: Mapped[datetime | None] = mapped_column(_TIMESTAMP)

    __table_args__ = (Index("ix_ratepay_adjustment_order_id", "order_id"),)


class RatepayProfile(Base):
    """The last PROFILE_REQUEST answer of one configured profile (``ratepay-oms profile
    refresh``): ``master_data`` is the ``master-data`` map as JSON, checked against every order
    before its PAYMENT_REQUEST. Holds no credential."""

    __tablename__ = "ratepay_profile"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(40), nullable=False, unique=True)
    profile_id: Mapped[str] = mapped_column(String(255), nullable=False)
    master_data: Mapped[str] = mapped_column(_LONG_TEXT, nullable=False)
    installment_config: Mapped[str | None] = mapped_column(Text)
    refreshed_at: Mapped[datetime] = mapped_column(_TIMESTAMP, nullable=False)
