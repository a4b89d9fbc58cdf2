"""Per-order leases: one worker works on one order at a time, and only while it does.

Work on an order happens in two shapes. Deciding and writing moves is one short transaction:
it row-locks the orders it works on (``FOR UPDATE SKIP LOCKED`` on PostgreSQL and MariaDB, so
two workers racing for the same orders never wait for each other, each takes what the other
has not; SQLite's ``BEGIN IMMEDIATE`` serialises writers instead) and skips orders somebody
holds a *lease* on. A gateway call outlives any transaction, so an order with a call planned
gets a lease, two columns on ``oms_order`` (``claimed_by``, ``claim_expires_at``) written in
the same transaction that planned the call and visible to every worker once it commits (on
PostgreSQL the tick's lock statement writes it ahead for the likely callers and the transaction
drops it again for those that planned no call: :meth:`Claims.lock`). The
lease is renewed while the call is in flight (:class:`LeaseKeeper`) and dropped in the
transaction that settles the last call of the order. So a worker never holds an order it is
not working on, and a manual event on an order that is merely due waits at most for one
short transaction. A lease that expired (its worker died) is taken over.

Leases run on the wall clock, never on a simulated ``now``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Integer, Table, any_, bindparam, exists, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

from ratepay_oms.engine.clock import wall_now
from ratepay_oms.engine.errors import OrderLockedError
from ratepay_oms.engine.persist import chunked, id_in, ids_clause, ids_style, ids_value, prebuilt
from ratepay_oms.errors import OmsError
from ratepay_oms.ops import instruments
from ratepay_oms.persistence.models import Intent, Order, intent_open
from ratepay_oms.persistence.statements import execute_rowless

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
                free = list(session.scalars(stmt))
                if free:
                    session.execute(
                        update(Order)
                        .where(id_in(Order.id, free, session))
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

    # -- inside the caller's transaction ------------------------------------------------------

    def lock(
        self,
        session: Session,
        order_ids: Sequence[int],
        open_intents: dict[int, bool] | None = None,
        lease: Sequence[int] = (),
        slots: int = 0,
        leased: set[int] | None = None,
    ) -> list[int]:
        """The orders of ``order_ids`` nobody holds a lease on, row-locked until the caller's
        transaction ends (locked by another transaction: skipped, not waited for).

        ``lease``, ``slots``, ``leased``: on PostgreSQL (with ``open_intents``), the same
        statement also leases the first ``slots`` orders it got of ``lease`` (those that will
        likely have a gateway call planned) and adds them to ``leased``; the caller's
        transaction drops again the leases of those that end up without a call
        (``Drive.transact``). Nobody else sees such a lease come and go: the row lock is held
        to the end of the transaction. That is one round trip less per planned call than
        locking here and leasing later (:meth:`lease_in`). Elsewhere ``leased`` stays empty.

        ``open_intents``: on PostgreSQL and SQLite, filled with whether each order it got has an
        open intent, read by the same statement (``Runner.open_intents``: a booking planned
        in this transaction need not ask again; nobody writes an intent of an order without
        its row lock or lease). Not on MariaDB, where a locking read's subquery may lock the
        intent rows it reads: left empty there (the runner asks)."""
        if not order_ids:
            return []
        now = wall_now()
        skip = self._skip_locked(session)
        got: list[int] = []
        expired: list[int] = []
        taken: list[int] = []
        style = ids_style(session)
        if open_intents is not None and session.get_bind().dialect.name not in (
            "postgresql", "sqlite"
        ):
            open_intents = None
        leasing = (
            leased is not None and slots > 0 and bool(lease) and open_intents is not None
            and skip and style == "array"
        )
        if leasing:
            statement = prebuilt("lock skip intents lease", style, _lock_leasing)
        elif open_intents is None:
            statement = prebuilt("lock skip" if skip else "lock", style,
                                 _lock_skipping if skip else _lock_waiting)
        else:
            statement = prebuilt("lock skip intents" if skip else "lock intents", style,
                                 _lock_skipping_intents if skip else _lock_waiting_intents)
        conn = session.connection()
        candidates = sorted(lease) if leasing else []
        until = now + self.lease
        for part in chunked(sorted(order_ids)):
            params: dict[str, Any] = {"ids": ids_value(part, style), "now": now}
            if leasing:
                params.update(lease=candidates, slots=slots, worker=self.worker_id,
                              until=until)
            rows = conn.execute(statement, params)
            for order_id, holder, *more in rows:
                got.append(order_id)
                if open_intents is not None:
                    open_intents[order_id] = bool(more[0])
                if leasing and more[1]:
                    # Ours now: an expired lease it replaced is taken over without a drop.
                    assert leased is not None
                    leased.add(order_id)
                    slots -= 1
                    if holder is not None:
                        taken.append(order_id)
                elif holder is not None:
                    expired.append(order_id)
            if leasing and slots <= 0:
                leasing = False
                statement = prebuilt("lock skip intents", style, _lock_skipping_intents)
        self._take_over(session, expired, also=len(taken))
        return got

    def held_in_range(self, session: Session, low: int, high: int) -> list[int]:
        """The orders with ids in ``(low, high]`` somebody holds a lease on, for a caller that
        works on the rest of that range in its transaction (:meth:`lock` for a range of ids).
        Only where the transaction holds the database's write lock (SQLite's ``BEGIN
        IMMEDIATE``): there is nothing to row-lock, and nobody can lease an order meanwhile.
        Expired leases in the range are taken over, as :meth:`lock` does."""
        if self._skip_locked(session):
            raise ValueError("held_in_range is for SQLite; the servers lock order by order")
        now = wall_now()
        held: list[int] = []
        expired: list[int] = []
        rows = session.connection().execute(
            select(_ORDERS.c.id, _ORDERS.c.claim_expires_at).where(
                _ORDERS.c.id > low, _ORDERS.c.id <= high, _ORDERS.c.claimed_by.is_not(None)
            )
        )
        for order_id, until in rows:
            if until is not None and until < now:
                expired.append(order_id)
            else:
                held.append(order_id)
        self._take_over(session, expired)
        return held

    def _take_over(self, session: Session, expired: Sequence[int], also: int = 0) -> None:
        """Drop the expired leases of ``expired`` (their workers died) and say so: counted in
        the metrics and logged, as a dead worker is something an operator wants to see.
        ``also``: expired leases already replaced by ours (:meth:`lock`'s ``lease``), counted
        and logged the same, nothing to drop."""
        if expired:
            self._drop(session, expired)
        count = len(expired) + also
        if not count:
            return
        instruments.note_takeovers(session, count)
        log.warning("taking over %d expired order leases of other workers", count)

    def _drop(self, session: Session, order_ids: Sequence[int]) -> None:
        """Clear the (expired) leases of ``order_ids``, whoever held them."""
        for part in chunked(sorted(order_ids)):
            session.execute(
                update(Order)
                .where(id_in(Order.id, part, session))
                .values(claimed_by=None, claim_expires_at=None)
                .execution_options(synchronize_session=False)
            )

    def lock_one(self, session: Session, order_id: int, what: str) -> None:
        """Row-lock one order for a manual action (waiting for a transaction that has it), or
        ``OrderLockedError`` while a worker holds its lease (a gateway call is in flight)."""
        stmt = select(Order.claimed_by, Order.claim_expires_at).where(Order.id == order_id)
        if self._skip_locked(session):
            stmt = stmt.with_for_update()
        holder, until = session.execute(stmt).one()
        if holder is None:
            return
        if until is not None and until >= wall_now():
            raise OrderLockedError(
                f"{what} is being worked on by {holder} (lease until {until} UTC); "
                "try again shortly, or run 'locks clear' if that worker died"
            )
        self._drop(session, [order_id])  # its worker died: taken over
        instruments.note_takeovers(session, 1)

    def lease_in(self, session: Session, order_ids: Sequence[int]) -> None:
        """Lease ``order_ids`` (row-locked by the caller) for a gateway call planned in the
        caller's transaction."""
        until = wall_now() + self.lease
        style = ids_style(session)
        statement = prebuilt("lease", style, _lease_statement)
        conn = session.connection()
        for part in chunked(sorted(order_ids)):
            execute_rowless(
                conn,
                statement,
                {"ids": ids_value(part, style), "worker": self.worker_id, "until": until},
            )

    def release_in(self, session: Session, order_ids: Sequence[int]) -> None:
        """Drop our leases on ``order_ids`` in the caller's transaction."""
        style = ids_style(session)
        statement = prebuilt("unlease", style, _release_statement)
        conn = session.connection()
        for part in chunked(sorted(order_ids)):
            execute_rowless(
                conn, statement, {"ids": ids_value(part, style), "worker": self.worker_id}
            )

    def renew(self, order_ids: Sequence[int]) -> None:
        """Push our leases on ``order_ids`` a full lease ahead (own short transaction)."""
        if not order_ids:
            return
        with self.sessions() as session, session.begin():
            until = wall_now() + self.lease
            for part in chunked(sorted(order_ids)):
                session.execute(
                    update(Order)
                    .where(id_in(Order.id, part, session), Order.claimed_by == self.worker_id)
                    .values(claim_expires_at=until)
                    .execution_options(synchronize_session=False)
                )

    # -- in short transactions of their own ---------------------------------------------------

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
            result = session.connection().execute(
                update(Order)
                .where(Order.claimed_by.is_not(None), Order.claim_expires_at < wall_now())
                .values(claimed_by=None, claim_expires_at=None)
            )
            return int(result.rowcount or 0)


class LeaseKeeper:
    """Renews the leases of orders whose gateway call is in flight, every third of a lease,
    from one daemon thread (started on first use), so a slow gateway never lets a lease run
    out under a call that is still going."""

    def __init__(self, claims: Claims) -> None:
        self.claims = claims
        self._lock = threading.Lock()
        self._orders: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def in_flight(self, order_id: int) -> _InFlight:
        """Within: ``order_id``'s lease is renewed (a call of it is in flight)."""
        return _InFlight(self, order_id)

    def _begin(self, order_id: int) -> None:
        with self._lock:
            self._orders[order_id] += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._renew, name="oms-lease-keeper", daemon=True
                )
                self._thread.start()

    def _end(self, order_id: int) -> None:
        with self._lock:
            self._orders[order_id] -= 1
            if self._orders[order_id] <= 0:
                del self._orders[order_id]

    def _renew(self) -> None:
        period = max(self.claims.lease.total_seconds() / 3, 0.05)
        while not self._stop.wait(period):
            with self._lock:
                orders = list(self._orders)
            try:
                self.claims.renew(orders)
            except Exception as exc:  # the database is away: the next round tries again
                log.warning("could not renew %d leases: %s", len(orders), exc)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _InFlight:
    """:meth:`LeaseKeeper.in_flight` as a plain context manager (one per gateway call: no
    generator to start and finish)."""

    __slots__ = ("keeper", "order_id")

    def __init__(self, keeper: LeaseKeeper, order_id: int) -> None:
        self.keeper = keeper
        self.order_id = order_id

    def __enter__(self) -> None:
        self.keeper._begin(self.order_id)

    def __exit__(self, *exc: object) -> None:
        self.keeper._end(self.order_id)


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


_ORDERS = cast(Table, Order.__table__)


def _lease_statement(style: str) -> Any:
    """``UPDATE oms_order SET claimed_by = :worker, claim_expires_at = :until WHERE id IN
    :ids`` (built once per ids style, see ``persist.prebuilt``)."""
    return (
        update(_ORDERS)
        .where(ids_clause(Order.id, style))
        .values(
            claimed_by=bindparam("worker", type_=_ORDERS.c.claimed_by.type),
            claim_expires_at=bindparam("until", type_=_ORDERS.c.claim_expires_at.type),
        )
    )


def _release_statement(style: str) -> Any:
    """Drop ``:worker``'s leases on ``:ids``."""
    return (
        update(_ORDERS)
        .where(
            ids_clause(Order.id, style),
            _ORDERS.c.claimed_by == bindparam("worker", type_=_ORDERS.c.claimed_by.type),
        )
        .values(claimed_by=None, claim_expires_at=None)
    )


def riding_lease() -> Any:
    """Our lease on one order (``:lease_order``) as a CTE for another statement to carry:
    ``UPDATE oms_order SET claimed_by = :lease_worker, claim_expires_at = :lease_until``
    (PostgreSQL; the planning of a call carries it on its intent's INSERT). Parameters named
    after no column of another table, so the carrying UPDATE or INSERT takes none of them
    for a value of its own."""
    return (
        update(_ORDERS)
        .where(_ORDERS.c.id == bindparam("lease_order", type_=_ORDERS.c.id.type))
        .values(
            claimed_by=bindparam("lease_worker", type_=_ORDERS.c.claimed_by.type),
            claim_expires_at=bindparam("lease_until", type_=_ORDERS.c.claim_expires_at.type),
        )
        .cte("leased")
    )


def riding_release() -> Any:
    """Drop our lease on one order (``:release_order``, ``:release_worker``) as a CTE for
    another statement to carry (the settle of an order's last call carries it on its
    compare-and-set); named as in :func:`riding_lease`."""
    return (
        update(_ORDERS)
        .where(
            _ORDERS.c.id == bindparam("release_order", type_=_ORDERS.c.id.type),
            _ORDERS.c.claimed_by
            == bindparam("release_worker", type_=_ORDERS.c.claimed_by.type),
        )
        .values(claimed_by=None, claim_expires_at=None)
        .cte("released")
    )


def _lock_statement(style: str) -> Any:
    """The free orders of ``:ids`` (no lease, or one expired before ``:now``), in id order."""
    return (
        select(_ORDERS.c.id, _ORDERS.c.claimed_by)
        .where(ids_clause(Order.id, style))
        .where(
            or_(
                _ORDERS.c.claimed_by.is_(None),
                _ORDERS.c.claim_expires_at
                < bindparam("now", type_=_ORDERS.c.claim_expires_at.type),
            )
        )
        .order_by(_ORDERS.c.id)
    )


def _lock_waiting(style: str) -> Any:
    return _lock_statement(style)


def _lock_skipping(style: str) -> Any:
    return _lock_statement(style).with_for_update(skip_locked=True)


def _open_intent_exists() -> Any:
    """Whether the order of the row has an open intent (a column of the lock statement).
    A locking read does not lock the rows of a subquery (PostgreSQL, InnoDB)."""
    intents = cast(Table, Intent.__table__)
    return (
        exists()
        .where(intents.c.order_id == _ORDERS.c.id, intent_open(intents.c.status))
        .correlate(_ORDERS)
        .label("open_intent")
    )


def _lock_waiting_intents(style: str) -> Any:
    return _lock_statement(style).add_columns(_open_intent_exists())


def _lock_skipping_intents(style: str) -> Any:
    return _lock_waiting_intents(style).with_for_update(skip_locked=True)


def _lock_leasing(style: str) -> Any:
    """PostgreSQL: :func:`_lock_skipping_intents` that also leases the first ``:slots`` of
    the orders it locks that are in ``:lease`` (to ``:worker`` until ``:until``), in one
    statement; a column says which it leased. The lock's columns come from the ``locked``
    CTE, so ``claimed_by`` is the holder before (an expired lease: a take-over), not ours."""
    locked = _lock_skipping_intents(style).cte("locked")
    first = (
        select(locked.c.id)
        .where(locked.c.id == any_(bindparam("lease", type_=ARRAY(Integer))))
        .order_by(locked.c.id)
        .limit(bindparam("slots", type_=Integer))
    )
    leased = (
        update(_ORDERS)
        .where(_ORDERS.c.id.in_(first))
        .values(
            claimed_by=bindparam("worker", type_=_ORDERS.c.claimed_by.type),
            claim_expires_at=bindparam("until", type_=_ORDERS.c.claim_expires_at.type),
        )
        .returning(_ORDERS.c.id)
        .cte("leased")
    )
    return (
        select(
            locked.c.id,
            locked.c.claimed_by,
            locked.c.open_intent,
            leased.c.id.is_not(None).label("leased"),
        )
        .select_from(locked.outerjoin(leased, leased.c.id == locked.c.id))
        .order_by(locked.c.id)
    )
