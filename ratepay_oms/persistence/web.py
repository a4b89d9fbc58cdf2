"""Tables of the web console (``ratepay_oms.web``): its users, their sessions, what they did.

They live here, beside the OMS tables, because Alembic's environment and the schema check
read every module of this package. The only writer is ``ratepay_oms.web`` (``users`` for
users and sessions, ``actions`` for the operator log).

The module also declares the indexes the console's queries need on the OMS tables (newest
orders first, by process, items of an order by state), so the orders list pages by key at a
million items without ``models.py`` knowing about the console.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ratepay_oms.persistence.base import Base
from ratepay_oms.persistence.models import LONG_TEXT, NAME, UTC_DATETIME, Order, OrderItem

ROLE_VIEWER = "viewer"
ROLE_OPERATOR = "operator"
ROLES = (ROLE_VIEWER, ROLE_OPERATOR)
"""A viewer sees every page; an operator also fires events and resolves intents."""


class WebUser(Base):
    """A person who may log in to the web console. ``password_hash`` is a self-describing
    scrypt string (``scrypt$n$r$p$salt$hash``, see ``ratepay_oms.web.passwords``)."""

    __tablename__ = "oms_web_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    role: Mapped[str] = mapped_column(String(20), nullable=False)
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)
    last_login_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)

    __table_args__ = (UniqueConstraint("name", name="uq_oms_web_user_name"),)


class WebSession(Base):
    """A logged-in browser. The cookie carries a random token; only its SHA-256 is stored, so
    a copy of the table opens no session. ``csrf_token`` is what every form of this session
    must send back; ``flash`` holds the outcome messages shown on the next page (JSON list)."""

    __tablename__ = "oms_web_session"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("oms_web_user.id", ondelete="CASCADE"), nullable=False
    )
    csrf_token: Mapped[str] = mapped_column(String(64), nullable=False)
    flash: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)

    __table_args__ = (
        UniqueConstraint("token_hash", name="uq_oms_web_session_token_hash"),
        Index("ix_oms_web_session_user_id", "user_id"),
    )


class WebAction(Base):
    """One thing a person asked for in the web console, done or refused, with their name.

    The engine's history says what moved; this says who asked and what came of it (also when
    the engine refused, which leaves no trace in the engine's tables). ``user_name`` is a copy,
    not a key: the record outlives the user.
    """

    __tablename__ = "oms_web_action"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_name: Mapped[str] = mapped_column(String(100), nullable=False)
    order_id: Mapped[int] = mapped_column(Integer, nullable=False)
    action: Mapped[str] = mapped_column(String(40), nullable=False)
    """``event`` or ``resolve intent``."""
    event: Mapped[str | None] = mapped_column(NAME)
    item_ids: Mapped[str | None] = mapped_column(LONG_TEXT)
    """JSON list of the chosen item ids."""
    detail: Mapped[str | None] = mapped_column(Text)
    """Event data or the resolution's note, as JSON."""
    outcome: Mapped[str] = mapped_column(String(20), nullable=False)
    """``done``, ``refused`` or ``failed``."""
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, nullable=False)

    __table_args__ = (Index("ix_oms_web_action_order_id", "order_id"),)


# Indexes the console's queries need on the OMS tables (created by migration 0009).
ORDER_CREATED_INDEX = Index("ix_oms_order_created_at", Order.created_at, Order.id)
"""Date-range search, newest first."""
ORDER_PROCESS_INDEX = Index("ix_oms_order_process", Order.process, Order.id)
"""Orders of one process, newest first (keyset on id)."""
ITEM_ORDER_STATE_INDEX = Index(
    "ix_oms_order_item_order_id_state", OrderItem.order_id, OrderItem.state
)
""""Has this order an item in state S" as one index probe; the page's state counts."""
ITEM_STATE_ORDER_INDEX = Index(
    "ix_oms_order_item_state_order_id", OrderItem.state, OrderItem.order_id
)
"""Orders with an item in a rare state, newest first, without reading every order."""
