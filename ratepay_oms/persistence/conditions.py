"""The last answer of every condition per item: what ``explain`` shows after the fact.

Spryker's users ask "why did this condition not fire?" and nobody can answer once the tick has
moved on. The engine keeps, per item and condition, the newest evaluation: whether it held,
when, in which state and for which event, and what the condition read to decide (``detail``,
JSON). One row per (item, condition): a polled event-less condition is evaluated on every tick,
so keeping every evaluation would grow the table without bound; the newest one is what an
operator needs, and the transition log keeps the moves it led to.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ratepay_oms.persistence.base import Base
from ratepay_oms.persistence.models import NAME, UTC_DATETIME


class ConditionResult(Base):
    """The newest evaluation of ``condition`` for one item (written by the engine only)."""

    __tablename__ = "oms_condition_result"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(
        ForeignKey("oms_order_item.id", ondelete="CASCADE"), nullable=False
    )
    order_id: Mapped[int] = mapped_column(Integer, nullable=False)
    process: Mapped[str] = mapped_column(NAME, nullable=False)
    state: Mapped[str] = mapped_column(NAME, nullable=False)
    event: Mapped[str | None] = mapped_column(NAME)
    """``None``: the condition of an event-less transition (polled by the tick)."""
    condition: Mapped[str] = mapped_column(NAME, nullable=False)
    result: Mapped[bool] = mapped_column(Boolean, nullable=False)
    detail: Mapped[str | None] = mapped_column(Text)
    """JSON of what the condition read (e.g. the outcome row it looked at), if it said."""
    evaluated_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)

    __table_args__ = (
        UniqueConstraint("item_id", "condition", name="uq_oms_condition_result_item_condition"),
        Index("ix_oms_condition_result_order_id", "order_id"),
    )
