"""The drive loop: the one firing path of ``place_order``, ``trigger``, ``resolve_intent`` and
every tick batch.

::

    decide + write moves (one transaction; external commands only plan: intent rows) ─▶ commit
       ─▶ each planned gateway call, outside any transaction (send, or reconcile); its
          API-log rows are held back
       ─▶ settle it (one transaction: the held API-log rows, compare-and-set the intent, apply
          the answer, choose, move, on-enter cascade, which may plan further calls) ─▶ commit
          (did it not commit: the held rows are written apart, each by itself) ─▶ loop

:meth:`Drive.transact` is the only place that opens a transaction for a :class:`Runner`; it
also writes the leases: an order with a call planned gets one in the same transaction (so it is
visible to every worker once the plan commits), and an order whose last call is settled loses
it in the settling transaction. :meth:`Drive.chain` runs one order's calls one after another
(so an order's calls keep their order); :class:`CallPool` runs the chains of up to K orders at
once on worker threads, each with its own sessions, stats and loop guard (the figures are added
to the shared ones under a lock), while the calling thread decides the next batch.

No transaction is open while a call is in flight: on SQLite nobody waits for the write lock
during a slow gateway, and on the servers no row lock is held across a network round trip.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine, Table, bindparam, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.pool import QueuePool

from ratepay_oms.engine.claims import LeaseKeeper
from ratepay_oms.engine.clock import naive_utc, retry_delay, wall_now
from ratepay_oms.engine.context import EngineContext
from ratepay_oms.engine.plugins import CallContext, CallNotSentError, Reconciled, ReconcileLater
from ratepay_oms.engine.runner import (
    ANSWERED,
    NOT_SENT,
    RECONCILED_BOOKED,
    RECONCILED_NOT_BOOKED,
    REPLANS,
    Call,
    HeldRowsRefused,
    Loaded,
    LoopGuard,
    PlanKey,
    Replan,
    Runner,
    RunStats,
    describe_error,
)
from ratepay_oms.persistence.db import PING_AFTER_IDLE_SECONDS, one_statement
from ratepay_oms.persistence.held import HeldRows, Rider, holding
from ratepay_oms.persistence.models import INTENT_PENDING, INTENT_UNKNOWN, Intent

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CONCURRENCY = 4
"""Gateway calls a tick keeps in flight at once (``tick --concurrency``): enough to hide a
gateway's latency behind the engine's own work on two cores without many idle connections."""


def by_order(calls: Sequence[Call]) -> dict[int, list[Call]]:
    """``calls`` per order, each order's in the order they were planned."""
    grouped: dict[int, list[Call]] = {}
    for call in calls:
        grouped.setdefault(call.order_id, []).append(call)
    return grouped


class Drive:
    """One unit of driving (a trigger, a placed order, a tick) at one business ``now``."""

    def __init__(
        self, engine: EngineContext, keeper: LeaseKeeper, now: datetime, stats: RunStats
    ) -> None:
        self.engine = engine
        self.keeper = keeper
        self.now = now
        self.stats = stats
        self._stats_lock = threading.Lock()
        self._leased_at: dict[int, float] = {}
        """When (monotonic) this drive's transactions last wrote each order's lease."""
        self._fresh_for = engine.claims.lease.total_seconds() / 3
        self._stored: dict[int, str] = {}
        """Intent summaries as ``_remember`` last wrote them (each chain its own intents)."""
        bind = engine.sessions.kw.get("bind")
        self._engine = bind if isinstance(bind, Engine) else None
        """The sessions' engine, ``None`` when they are bound to something else."""
        self._bind = bind if isinstance(bind, Engine) and isinstance(bind.pool, QueuePool) else None
        """The engine whose connections a thread may keep between transactions
        (:meth:`connected`); ``None``: sessions bound to something else (a test's connection),
        or a pool that hands one thread the same connection twice (SQLite in memory)."""
        self._local = threading.local()

    @contextmanager
    def connected(self) -> Iterator[None]:
        """Within: this thread's transactions of the drive run on one connection and one
        ``Session``, checked out at the first and handed back at the end, instead of a
        session and a pool checkout (with its check-in, reset and listeners) for each. A
        chain's consecutive transactions and a tick's batches are many short transactions in
        a row on one thread: this is a third of the session machinery per order.

        The connection is only *kept* between transactions, never a transaction: each still
        commits (or rolls back) before :meth:`transact` returns, so no gateway call runs
        inside one. A database error drops the connection (the next transaction checks out
        a fresh one); one idle for longer than ``PING_AFTER_IDLE_SECONDS`` (a slow gateway)
        is pinged first, as the pool pings the connections it hands out. Each thread keeps
        its own (a pool's chains: one each, as they held one each before, one at a time).
        Nested: the outer block's connection."""
        if self._bind is None or getattr(self._local, "line", None) is not None:
            yield
            return
        line = _Line(self.engine.sessions, self._bind)
        self._local.line = line
        try:
            yield
        finally:
            self._local.line = None
            line.drop()

    # -- transactions ----------------------------------------------------------------------

    def transact(
        self,
        work: Callable[[Runner], T],
        guard: LoopGuard,
        *,
        release: Collection[int] = (),
        held: HeldRows | None = None,
        ride: bool = False,
        replan: bool = True,
    ) -> tuple[T, list[Call]]:
        """Run ``work`` in one transaction with a :class:`Runner`; lease the orders it
        planned calls for and drop our lease on ``release`` (those without a new call), in
        the same transaction; commit. The figures count only once it committed. Orders
        ``work`` leased ahead (``Runner.leased``, the tick's lock) are not leased again;
        those of them without a call lose the lease again before the commit.

        ``held``: the API-log rows of the call this transaction settles, written first in it
        (one INSERT; see :func:`_begin`) and cleared once it committed. If it does not, they
        stay held and the caller writes them apart. ``ride``: ``work`` is a settle (its first
        statement the compare-and-set), which carries the rows where the database can
        (:meth:`HeldRows.rider`) instead of a statement of their own; refused there, the
        transaction is rolled back and ``work`` runs again without them (written apart).

        ``work`` must be database-only and may be run more than once: its plans run without
        a savepoint (``replan``, see ``Replan``), and when one raises the transaction is
        rolled back and ``work`` runs again in a new one with that plan known to fail (at
        most ``REPLANS`` times; then with a savepoint around each plan). Only the attempt
        that commits counts: its stats, calls, leases, loop-guard counts and held rows.
        ``replan=False``: a savepoint around each plan, ``work`` runs once."""
        known: dict[PlanKey, Exception] = {}
        start = guard.checkpoint() if replan or ride else None
        attempt = 0
        while True:
            stats = RunStats()
            planning = Replan(known, savepoints=attempt >= REPLANS) if replan else None
            line: _Line | None = getattr(self._local, "line", None)
            try:
                with line.session() if line is not None else self.engine.sessions() as session:
                    transaction, taken, rider = _begin(session, held, ride)
                    with transaction:
                        runner = Runner(self.engine, session, self.now, guard, stats)
                        runner.replan = planning
                        runner.rider = rider
                        if ride and len(release) == 1:
                            (runner.release_with_settle,) = release
                        result = work(runner)
                        if planning is not None and planning.failed is not None:
                            raise planning.failed  # swallowed on the way: still roll back
                        if rider is not None:
                            # Not carried (the work wrote no compare-and-set): written now.
                            if runner.rider is not None and not (
                                held is not None and held.write_in(session.connection())
                            ):
                                raise HeldRowsRefused("the held rows were refused")
                            taken = True
                        runner.finish()
                        calls = runner.calls
                        leased = {c.order_id for c in calls}
                        ahead = runner.leased
                        # The lease of an order with a call: written by its intent's INSERT,
                        # or here unless still fresh (but always when the settle dropped it).
                        with_intent = runner.leased_with_intent
                        dropped = runner.released
                        written = sorted(
                            o for o in leased
                            if o not in ahead and o not in with_intent
                            and (o in dropped or not self._lease_fresh(o))
                        )
                        if written:
                            self.engine.claims.lease_in(session, written)
                        # Leased ahead but no call planned after all: dropped again before
                        # commit (the settle's compare-and-set may have dropped it already).
                        done = [o for o in release if o not in leased and o not in dropped]
                        done.extend(sorted(ahead - leased))
                        if done:
                            self.engine.claims.release_in(session, done)
                        # From here on only the bookkeeping after the commit reads these:
                        # every lease this transaction wrote, every one it dropped.
                        done.extend(o for o in dropped if o not in leased)
                        written.extend(o for o in with_intent if o not in ahead)
            except HeldRowsRefused as refused:
                if line is not None:
                    line.drop()
                log.warning("held API-log rows not written with the settle (%s); settling "
                            "without them, writing them apart", refused)
                assert start is not None
                guard.restore(start)
                held = None  # not tried again in this transaction: written apart after it
                continue
            except Exception:
                if line is not None:
                    line.drop()  # whatever the error did to the connection: a fresh one next
                failed = planning.failed if planning is not None else None
                if failed is None:
                    raise
                assert start is not None
                guard.restore(start)
                known[failed.key] = failed.error
                attempt += 1
                log.info(
                    "a plan failed (%s for order %s); transaction rolled back, running "
                    "it again with that plan failed (attempt %d)",
                    failed.key[4], failed.key[0], attempt + 1,
                )
                continue
            break
        if line is not None:
            line.used = time.monotonic()
        if taken and held is not None:
            held.clear()
        clock = time.monotonic()
        with self._stats_lock:
            self.stats.add(stats)
            for order_id in written:
                self._leased_at[order_id] = clock
            for order_id in ahead & leased:
                self._leased_at[order_id] = clock
            for order_id in done:
                self._leased_at.pop(order_id, None)
        return result, calls

    def _lease_fresh(self, order_id: int) -> bool:
        """Whether this drive wrote the order's lease less than a third of a lease ago: then
        it runs at least two thirds of a lease more, and the lease keeper renews it every
        third while the next call is in flight, so a chain's settle does not write it again
        (an UPDATE per call saved). Older: written again, as the first time."""
        with self._stats_lock:
            at = self._leased_at.get(order_id)
        return at is not None and time.monotonic() - at < self._fresh_for

    def run(self, work: Callable[[Runner], T]) -> T:
        """``work`` in one transaction, then its calls and their cascades to the end (in this
        thread: a manual event or a placed order returns when its items rest)."""
        guard = LoopGuard()
        with self.connected():
            result, calls = self.transact(work, guard)
            for order_calls in by_order(calls).values():
                self.chain(order_calls, guard)
        return result

    # -- gateway calls -----------------------------------------------------------------------

    def chain(self, calls: Sequence[Call], guard: LoopGuard | None = None) -> None:
        """One order's calls, one at a time, each settled before the next; a settle may plan
        more (the cascade goes on). The order's lease goes with the last settle."""
        if not calls:
            return
        guard = guard if guard is not None else LoopGuard()
        if getattr(self._local, "line", None) is not None:
            self._chain(calls, guard)  # on the thread's kept connection already (a tick)
            return
        with self.connected():
            self._chain(calls, guard)

    def _chain(self, calls: Sequence[Call], guard: LoopGuard) -> None:
        queue = deque(calls)
        order_id = calls[0].order_id
        while queue:
            call = queue.popleft()
            try:
                queue.extend(self._one(call, guard, last=not queue))
            except SQLAlchemyError as exc:
                # The intent (if written) stays open and is reconciled; nothing is lost.
                self.database_failed(f"{call.command} for order #{order_id}", exc)
                with self._stats_lock:  # whatever we wrote, it is not ours to count on now
                    self._leased_at.pop(order_id, None)
                try:
                    self.engine.claims.release([order_id])
                except SQLAlchemyError as again:
                    log.warning("could not release order #%s (lease expires): %s",
                                order_id, again)
                return

    def _one(self, call: Call, guard: LoopGuard, *, last: bool) -> list[Call]:
        command = self.engine.registry.external(call.command)
        io = CallContext(self.engine.services, remember=lambda f: self._remember(call, f))
        release = (call.order_id,) if last else ()
        work: Callable[[Runner], object]
        held = self._held()
        settles = False  # ``work`` is a settle: the held rows may ride on its compare-and-set
        try:
            with self.keeper.in_flight(call.order_id), holding(held):
                if call.prepared is None:
                    work = self._reconciled(call, command.reconcile, io)
                else:
                    try:
                        answer = command.send(call.prepared, io)
                    except CallNotSentError as exc:
                        verdict = Reconciled(False, detail=describe_error(exc))
                        work, settles = _settle(call, verdict, NOT_SENT), True
                    except Exception as exc:
                        message = describe_error(exc)
                        log.warning("intent %s left open after: %s", call.intent_id, message)
                        work = _leave_open(call, message)
                    else:
                        work = _settle(call, answer, ANSWERED, record_stays=call.record_stays,
                                       loaded=call.loaded)
                        settles = True
            _, more = self.transact(work, guard, release=release, held=held, ride=settles)
        finally:
            self._stored.pop(call.intent_id, None)
            if held is not None:
                held.write_apart()  # what the settle did not commit (nothing when it did)
        return more

    def _held(self) -> HeldRows | None:
        """A holder for the API-log rows of one call (the send and its status lookups), for
        its settling transaction to write: only when the sessions use an engine of their own
        (the sink defers only to that very engine; a test's connection: written at once)."""
        return HeldRows(self._engine) if self._engine is not None else None

    def _reconciled(
        self,
        call: Call,
        reconcile: Callable[[dict[str, Any], CallContext], Reconciled | None],
        io: CallContext,
    ) -> Callable[[Runner], object]:
        """Ask what the lost call booked; what to write about it."""
        try:
            verdict = reconcile(call.summary, io)
        except ReconcileLater as later:
            log.info("intent %s not final yet: %s", call.intent_id, later.detail)
            return _ask_later(call, later)
        except Exception as exc:
            return _lookup_failed(call, describe_error(exc))
        if verdict is None:
            return _unknown(call)
        resolution = RECONCILED_BOOKED if verdict.booked else RECONCILED_NOT_BOOKED
        log.info("intent %s reconciled: %s %s", call.intent_id, resolution, verdict.detail)
        return _settle(call, verdict, resolution, note=verdict.detail or None)

    def _remember(self, call: Call, facts: Mapping[str, Any]) -> None:
        """Merge ``facts`` into the intent's summary, committed before the call goes on (the
        transaction id PAYMENT_INIT gave is what reconciles a lost PAYMENT_REQUEST). Only
        this does write a summary after the plan, so when the plan's summary is known the
        row is not read back: one UPDATE, committing by itself (``one_statement``)."""
        stored = self._stored.get(call.intent_id, call.stored)
        line: _Line | None = getattr(self._local, "line", None)
        with line.writing() if line is not None else _writing(self.engine.sessions) as conn:
            if stored is None:
                stored = conn.execute(
                    select(_INTENTS.c.summary).where(_INTENTS.c.id == call.intent_id)
                ).scalar_one()
            merged = _merged(stored, facts)
            conn.execute(_SUMMARY_UPDATE, {"intent_id": call.intent_id, "summary": merged})
        self._stored[call.intent_id] = merged

    def database_failed(self, where: str, exc: SQLAlchemyError) -> None:
        orig = getattr(exc, "orig", None) or exc
        first = (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]
        self.error(f"database error in {where}: {type(orig).__name__}: {first}")

    def error(self, message: str) -> None:
        """Log ``message`` and count it in the stats (calls in flight on the pool count
        theirs at the same time)."""
        log.error("%s", message)
        with self._stats_lock:
            self.stats.error(message)


class _Line:
    """One thread's connection and session for a run of a drive's transactions
    (:meth:`Drive.connected`), checked out at the first transaction; on PostgreSQL a second
    one in autocommit for the writes that commit by themselves (:meth:`writing`)."""

    __slots__ = ("_session", "autocommit", "bind", "conn", "sessions", "used", "writer", "wrote")

    def __init__(self, sessions: sessionmaker[Session], bind: Engine) -> None:
        self.sessions = sessions
        self.bind = bind
        self.autocommit = bind.dialect.name == "postgresql"
        self.conn: Connection | None = None
        self._session: Session | None = None
        self.used = 0.0
        """When (monotonic) the last transaction on ``conn`` ended."""
        self.writer: Connection | None = None
        self.wrote = 0.0
        """When (monotonic) the last write on ``writer`` ended."""

    def session(self) -> Session:
        """The session for the next transaction, on the kept connection (closed after the
        transaction like any session: its objects go, the connection stays). A session bound
        to a connection that is not in a transaction begins one and commits it itself."""
        conn = self._alive(self.conn, self.used)
        session = self._session
        if conn is None or session is None:
            self.drop()
            conn = self.conn = self.bind.connect()
            session = self._session = self.sessions(bind=conn)
        return session

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """``one_statement`` on a kept connection: on PostgreSQL the autocommit one (each
        statement commits by itself, in one round trip), elsewhere a transaction of its own
        on the kept connection (between two of the drive's transactions, so none is open
        on it). A failure hands the connection back."""
        try:
            if self.autocommit:
                conn = self._alive(self.writer, self.wrote)
                if conn is None:
                    conn = self.bind.connect()
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                    self.writer = conn
                # Each statement committed as it ran; SQLAlchemy's own record of a begun
                # transaction (the database has none) ends with the connection.
                yield conn
                self.wrote = time.monotonic()
                return
            self.session()  # connects, or pings a connection idle too long
            assert self.conn is not None
            with self.conn.begin():
                yield self.conn
            self.used = time.monotonic()
        except BaseException:
            self.drop()
            raise

    def _alive(self, conn: Connection | None, since: float) -> Connection | None:
        """``conn``, pinged first when idle for longer than ``PING_AFTER_IDLE_SECONDS`` (as
        the pool pings a connection it hands out); ``None`` (and invalidated) when dead."""
        if conn is None or time.monotonic() - since <= PING_AFTER_IDLE_SECONDS:
            return conn
        dbapi_connection = conn.connection.dbapi_connection
        try:
            if dbapi_connection is not None:
                self.bind.dialect.do_ping(dbapi_connection)
        except self.bind.dialect.loaded_dbapi.Error as exc:
            log.info("a kept database connection was dead (%s); connecting afresh", exc)
            conn.invalidate()
            return None
        return conn

    def drop(self) -> None:
        """Hand the connections back to the pool (an invalidated one: the pool replaces it)."""
        kept = (self.conn, self.writer)
        self.conn, self._session, self.writer = None, None, None
        for conn in kept:
            if conn is None:
                continue
            try:
                conn.close()
            except SQLAlchemyError as exc:  # the pool discards it; nothing of ours was in it
                log.warning("could not hand back a database connection: %s", exc)


_INTENTS = cast(Table, Intent.__table__)
_SUMMARY_UPDATE = (
    update(_INTENTS)
    .where(_INTENTS.c.id == bindparam("intent_id", type_=_INTENTS.c.id.type))
    .values(summary=bindparam("summary", type_=_INTENTS.c.summary.type))
)


@contextmanager
def _writing(sessions: sessionmaker[Session]) -> Iterator[Connection]:
    """``one_statement`` on the sessions' engine (a session's transaction when they are bound
    to something else)."""
    bind = sessions.kw.get("bind")
    if isinstance(bind, Engine):
        with one_statement(bind) as conn:
            yield conn
        return
    with sessions() as session, session.begin():
        yield session.connection()


def _begin(
    session: Session, held: HeldRows | None, ride: bool
) -> tuple[SessionTransaction, bool, Rider | None]:
    """Begin ``session``'s transaction with ``held``'s rows written first; whether they are
    in it. First, so that when the database refuses them nothing of the work is lost with the
    rolled-back transaction: the work runs in a fresh one and the rows are written apart.
    ``ride``: the rows as a :class:`Rider` for the work's first statement to carry, where
    they can be (then not written here)."""
    transaction = session.begin()
    if not held:
        return transaction, False, None
    try:
        rider = held.rider(session.connection()) if ride else None
    except Exception:
        log.warning("held API-log rows could not be prepared for the settle; writing them "
                    "apart", exc_info=True)
    else:
        if rider is not None:
            return transaction, False, rider
        if held.write_in(session.connection()):
            return transaction, True, None
    transaction.rollback()
    return session.begin(), False, None


def _merged(summary: str, facts: Mapping[str, Any]) -> str:
    import json

    data = json.loads(summary)
    data.update(facts)
    return json.dumps(data, default=str, sort_keys=True)


def _settle(
    call: Call, answer: Any, resolution: str, *, record_stays: bool = False,
    note: str | None = None, loaded: Loaded | None = None,
) -> Callable[[Runner], object]:
    return lambda runner: runner.settle(
        call.intent_id, answer, resolution, record_stays=record_stays, note=note,
        loaded=loaded,
    )


def _leave_open(call: Call, message: str) -> Callable[[Runner], object]:
    return lambda runner: runner.leave_open(call.intent_id, message)


def _lookup_failed(call: Call, message: str) -> Callable[[Runner], object]:
    def work(runner: Runner) -> None:
        intent = runner.session.get_one(Intent, call.intent_id)
        intent.attempts = (intent.attempts or 0) + 1
        intent.last_error = f"status lookup failed: {message}"
        intent.reconcile_at = wall_now() + retry_delay(intent.attempts)
        runner.stats.error(f"intent {call.intent_id}: status lookup failed: {message}")

    return work


def _ask_later(call: Call, later: ReconcileLater) -> Callable[[Runner], object]:
    """Not final yet: ask again with backoff (at the latest when it becomes final)."""

    def work(runner: Runner) -> None:
        intent = runner.session.get_one(Intent, call.intent_id)
        intent.attempts = (intent.attempts or 0) + 1
        intent.last_error = f"not final yet: {later.detail}"
        when = wall_now() + retry_delay(intent.attempts)
        if later.at is not None:
            when = min(when, max(naive_utc(later.at), wall_now()))
        intent.reconcile_at = when

    return work


def _unknown(call: Call) -> Callable[[Runner], object]:
    def work(runner: Runner) -> None:
        runner.session.execute(
            update(Intent)
            .where(Intent.id == call.intent_id, Intent.status == INTENT_PENDING)
            .values(
                status=INTENT_UNKNOWN,
                last_error="the status lookup cannot settle it (no status source configured, "
                "or an answer that fits neither booked nor not booked); a person must check "
                "and resolve it",
            )
            .execution_options(synchronize_session=False)
        )
        message = (
            f"intent {call.intent_id} ({call.command}): outcome unknown, waiting for a person "
            f"(ratepay-oms intents resolve {call.intent_id} --booked|--not-booked)"
        )
        log.warning("%s", message)
        runner.stats.error_messages.append(message)

    return work


class CallPool:
    """Up to ``size`` orders' call chains at once, on worker threads.

    Each chain is one order (at most one call per order in flight, in the order planned);
    the pool counts orders it holds so the caller plans no more than it can start at once.
    """

    def __init__(self, drive: Drive, size: int) -> None:
        self.drive = drive
        self.size = size
        self._busy = 0
        self._cond = threading.Condition()
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="oms-call")

    def free(self) -> int:
        with self._cond:
            return self.size - self._busy

    def wait_for_room(self) -> int:
        """Block until at least half the pool (at least one slot) is free; the free slots."""
        want = max(1, self.size // 2)
        with self._cond:
            while self.size - self._busy < want:
                self._cond.wait()
            return self.size - self._busy

    def submit(self, calls: Sequence[Call]) -> None:
        for order_calls in by_order(calls).values():
            with self._cond:
                self._busy += 1
            self._executor.submit(self._chain, order_calls)

    def _chain(self, calls: Sequence[Call]) -> None:
        try:
            self.drive.chain(calls)  # on a connection of its own for the whole chain
        except Exception:  # a chain never takes the pool down; its intent stays open
            log.exception("gateway calls of order #%s failed", calls[0].order_id)
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def join(self) -> None:
        with self._cond:
            while self._busy:
                self._cond.wait()

    def close(self) -> None:
        self.join()
        self._executor.shutdown(wait=True)
