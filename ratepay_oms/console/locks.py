"""The per-order leases tick workers hold, and clearing the ones a crash left behind.

A worker leases an order (``oms_order.claimed_by`` / ``claim_expires_at``) while it works on it,
so a by-order command is never split or doubled. A worker that dies leaves its lease until it
expires; the engine takes expired leases over by itself, but a manual ``event`` on such an
order is refused until then. Clearing expired leases (Spryker's ``oms:clear-locks``) is always
safe; clearing live ones (``force``) is only safe when the worker is known to be gone.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, select, update

from ratepay_oms.console._session import session_of, utc_now
from ratepay_oms.persistence.models import Order, OrderItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    order_ref: str
    process: str
    claimed_by: str
    claim_expires_at: datetime | None
    expired: bool
    items: int

    def to_json(self) -> dict[str, Any]:
        return {
            "order_ref": self.order_ref,
            "process": self.process,
            "claimed_by": self.claimed_by,
            "claim_expires_at": (
                self.claim_expires_at.isoformat() if self.claim_expires_at else None
            ),
            "expired": self.expired,
            "items": self.items,
        }


def _is_expired(expires: datetime | None, now: datetime) -> bool:
    # A lease without an expiry can only come from a bug or a hand edit; treat it as stale.
    return expires is None or expires <= now


def list_leases(source: Any, *, now: datetime | None = None) -> list[Lease]:
    """Every order currently leased by a worker, oldest expiry first."""
    now = now or utc_now()
    items = (
        select(func.count(OrderItem.id))
        .where(OrderItem.order_id == Order.id)
        .correlate(Order)
        .scalar_subquery()
    )
    stmt = (
        select(Order.order_ref, Order.process, Order.claimed_by, Order.claim_expires_at, items)
        .where(Order.claimed_by.is_not(None))
        .order_by(Order.claim_expires_at, Order.order_ref)
    )
    with session_of(source) as session:
        return [
            Lease(ref, proc, worker, expires, _is_expired(expires, now), int(n or 0))
            for ref, proc, worker, expires, n in session.execute(stmt)
        ]


def clear_leases(source: Any, *, now: datetime | None = None, force: bool = False) -> list[str]:
    """Release expired leases (or, with ``force``, every lease); returns the order refs freed.

    One ``UPDATE`` whose ``WHERE`` repeats the expiry test, so a lease a live worker renews
    between our read and our write is not cleared.
    """
    now = now or utc_now()
    condition: ColumnElement[bool] = Order.claimed_by.is_not(None)
    if not force:
        condition = condition & (Order.claim_expires_at.is_(None) | (Order.claim_expires_at <= now))
    with session_of(source) as session:
        with session.begin() if not session.in_transaction() else nullcontext():
            refs = list(session.scalars(select(Order.order_ref).where(condition)))
            if refs:
                session.execute(
                    update(Order)
                    .where(condition, Order.order_ref.in_(refs))
                    .values(claimed_by=None, claim_expires_at=None)
                    .execution_options(synchronize_session=False)
                )
        if refs:
            log.warning("cleared %d order lease(s)%s", len(refs), " (forced)" if force else "")
        return refs
