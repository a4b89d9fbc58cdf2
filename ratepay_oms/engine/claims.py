"""Per-order leases: one worker works on one order at a time.

A lease is two columns on ``oms_order`` (``claimed_by``, ``claim_expires_at``), taken and
released in short transactions of their own, so it is visible to every other worker while the
long transaction that does the work is still open (the pitfall Spryker's docs warn about when
the lock lives inside the caller's transaction). On PostgreSQL and MariaDB the claim reads the
rows ``FOR UPDATE SKIP LOCKED``: two workers racing for the same orders never wait for each
other, each takes what the other has not. SQLite has no row locks; its ``BEGIN IMMEDIATE``
serialises the claim instead. A lease that expired (its worker died) is taken over.

Leases run on the wall clock, never on a simulated ``now``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ratepay_oms.engine.clock import wall_now
from ratepay_oms.engine.persist import chunked
from ratepay_oms.persistence.models import Order

log = logging.getLogger(__name__)


class Claims:
    def __init__(self, sessions: sessionmaker[Session], worker_id: str, lease_seconds: int) -> None:
        self.sessions = sessions
        self.worker_id = worker_id
        self.lease = timedelta(seconds=lease_seconds)

    def _skip_locked(self, session: Session) -> bool:
        return session.get_bind().dialect.name in ("postgresql", "mysql", "mariadb")

    def claim(self, order_ids: Sequence[int]) -> list[int]:
        """Lease whichever of ``order_ids`` nobody else holds; returns the ones we got."""
        if not order_ids:
            return []
        got: list[int] = []
        with self.sessions() as session, session.begin():
            now = wall_now()
            skip = self._skip_locked(session)
            for part in chunked(sorted(order_ids)):
                stmt = (
                    select(Order.id)
                    .where(Order.id.in_(part))
                    .where(
                        or_(
                            Order.claimed_by.is_(None),
                            Order.claim_expires_at < now,
                            Order.claimed_by == self.worker_id,
                        )
                    )
                    .order_by(Order.id)
                )
                if skip:
                    stmt = stmt.with_for_update(skip_locked=True)
                free = list(session.scalars(stmt))
                if free:
                    session.execute(
                        update(Order)
                        .where(Order.id.in_(free))
                        .values(claimed_by=self.worker_id, claim_expires_at=now + self.lease)
                        .execution_options(synchronize_session=False)
                    )
                    got.extend(free)
        if len(got) < len(order_ids):
            log.debug(
                "%d of %d orders are leased by other workers",
                len(order_ids) - len(got),
                len(order_ids),
            )
        return got

    def release(self, order_ids: Sequence[int]) -> None:
        if not order_ids:
            return
        with self.sessions() as session, session.begin():
            for part in chunked(sorted(order_ids)):
                session.execute(
                    update(Order)
                    .where(Order.id.in_(part), Order.claimed_by == self.worker_id)
                    .values(claimed_by=None, claim_expires_at=None)
                    .execution_options(synchronize_session=False)
                )

    def holder(self, order_id: int) -> tuple[str | None, object]:
        """Who holds ``order_id`` and until when (for error messages)."""
        with self.sessions() as session:
            row = session.execute(
                select(Order.claimed_by, Order.claim_expires_at).where(Order.id == order_id)
            ).one()
            return row[0], row[1]

    def clear_expired(self) -> int:
        """Drop leases whose time passed (``locks clear``); returns how many."""
        with self.sessions() as session, session.begin():
            result = session.execute(
                update(Order)
                .where(Order.claimed_by.is_not(None), Order.claim_expires_at < wall_now())
                .values(claimed_by=None, claim_expires_at=None)
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]
