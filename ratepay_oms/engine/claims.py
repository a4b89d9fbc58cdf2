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

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from ratepay_oms.engine.clock import wall_now
from ratepay_oms.engine.persist import chunked, id_in
from ratepay_oms.errors import OmsError
from ratepay_oms.ops import instruments
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
        takeovers = 0
        with self.sessions() as session, session.begin():
            now = wall_now()
            skip = self._skip_locked(session)
            for part in chunked(sorted(order_ids)):
                stmt = (
                    select(Order.id, Order.claimed_by)
                    .where(id_in(Order.id, part, session))
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
                rows = session.execute(stmt).all()
                free = [order_id for order_id, _holder in rows]
                # An expired lease of another worker: it died or hung (counted for alerts).
                taken_over = sum(1 for _id, h in rows if h is not None and h != self.worker_id)
                if free:
                    session.execute(
                        update(Order)
                        .where(id_in(Order.id, free, session))
                        .values(claimed_by=self.worker_id, claim_expires_at=now + self.lease)
                        .execution_options(synchronize_session=False)
                    )
                    got.extend(free)
                    takeovers += taken_over
        if takeovers:
            instruments.LEASE_TAKEOVERS.inc(takeovers)
            log.warning("took over %d expired order leases of other workers", takeovers)
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
                    .where(id_in(Order.id, part, session), Order.claimed_by == self.worker_id)
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


# -- one tick worker per SQLite database --------------------------------------------------


class SqliteWorkerBusyError(OmsError):
    """Another tick worker is running on the same SQLite database file."""


class SqliteWorkerLock:
    """An exclusive ``flock`` on ``<database>.tick-lock`` for the length of one tick.

    SQLite has no row locks, so two tick workers on one file would serialise on the database
    lock, wait on each other's busy timeouts and fail in the middle of batches. Instead the
    second worker is refused at once with a message that names the holder. The lock lives in
    the kernel, not in a row: a worker that dies (even by SIGKILL) loses it at once, so a stale
    lease can never block the next worker; the pid/host written into the file only serve the
    message. A database without a file (``:memory:``) has nobody to share with: no lock.
    """

    def __init__(self, database_path: str | None) -> None:
        self.path = f"{database_path}.tick-lock" if database_path else None
        self._fd: int | None = None

    def acquire(self) -> None:
        if self.path is None or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "pid ?, host ?"
            os.close(fd)
            raise SqliteWorkerBusyError(
                f"another tick worker is running on this SQLite database ({holder}); SQLite "
                "supports one worker — use PostgreSQL or MariaDB for several"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, host {socket.gethostname()}".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock


def sqlite_worker_lock(sessions: sessionmaker[Session]) -> SqliteWorkerLock | None:
    """The worker lock for a SQLite file database, ``None`` for servers (they have leases)."""
    bind = sessions.kw.get("bind")
    url = getattr(bind, "url", None)
    if url is None or url.get_backend_name() != "sqlite":
        return None
    name = url.database or ""
    if not name or name == ":memory:" or name.startswith("file:") or "mode=memory" in str(url):
        return SqliteWorkerLock(None)
    return SqliteWorkerLock(os.path.abspath(name))
