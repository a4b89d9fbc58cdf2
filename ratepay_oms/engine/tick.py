"""The tick: everything periodic, in order, in batches, one leased order at a time.

Four kinds of due work, done in this order so that one tick settles what the previous steps
started: (1) retries whose time has come, (2) timeouts that are due, (3) items resting in a
state that has an on-enter event (a crash or a failure left them there), (4) items in a state
with event-less transitions (their conditions are polled). Items with a retry scheduled are
left to step 1, so a failing timeout or on-enter command is retried with backoff instead of on
every tick (Spryker's timeout check re-fires it every run).

Each step walks the due items in batches ordered by order id (keyset, not OFFSET). The order
ids come in *windows* of ``WINDOW_BATCHES`` batches: without a composite index the database
finds the next due order ids by reading every due row and keeping the lowest (it prefers the
``(process, state)`` index to walking ``order_id``), so asking once per batch read all waiting
rows per 500 items (quadratic in a bulk tick); a window costs one such read per twenty
batches, and memory stays bounded (a composite index would remove the read altogether). A
batch leases its orders first, then re-reads what is due *for the leased orders only* in the
transaction that does the work: what another worker finished in the meantime is no longer
due, so no command runs twice. That re-read asks by ``order_id`` alone and sorts out what is
due in Python, so the database cannot pick the ``(process, state)`` index and read every
waiting row of the process for one batch's orders.

Due items are read as plain rows. Those whose move needs nothing but the database (a fixed
transition without command or condition that lands where no on-enter event waits:
``CompiledProcess.plain_move``) are written set-based from their ids, with the same rows the
runner would write; only orders with other work are loaded as ORM objects and handed to the
runner. A bulk tick of such moves costs a few statements per thousand items.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from sqlalchemy import ColumnElement, Select, and_, false, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ratepay_oms.engine.claims import Claims, sqlite_worker_lock
from ratepay_oms.engine.compiler import CompiledProcess
from ratepay_oms.engine.intents import ExternalCalls
from ratepay_oms.engine.persist import MoveKey, Origin, StateWriter, chunked, id_in
from ratepay_oms.engine.plugins import PluginRegistry
from ratepay_oms.engine.runner import Deferred, Runner, RunStats, group_items
from ratepay_oms.engine.views import TickResult
from ratepay_oms.persistence.models import EventTimeout, Order, OrderItem
from ratepay_oms.process.model import TransitionDef

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500
"""Due items per batch (a batch takes whole orders, so it can be a few more; plain moves
count less, see ``PLAIN_WEIGHT``)."""
PLAIN_WEIGHT = 0.25
"""What a due item with a plain move (``CompiledProcess.plain_move``) counts towards a batch:
such a batch runs no command and calls nobody, so four times as many fit in the same short
transaction and lease, and the per-batch cost (three transactions, a dozen statements) is
spread over more items."""
WINDOW_BATCHES = 20
"""Batches' worth of due order ids fetched by one query (see the module docstring)."""
MAX_DB_FAILURES_IN_A_ROW = 3
"""A tick gives up after this many batches in a row failed in the database (it is down)."""


def _states_filter(states_by_process: Mapping[str, Sequence[str]]) -> ColumnElement[bool]:
    clauses = [
        and_(OrderItem.process == process, OrderItem.state.in_(states))
        for process, states in states_by_process.items()
        if states
    ]
    return or_(*clauses) if clauses else false()


if TYPE_CHECKING:  # SQLAlchemy 2.1 types a select by its columns; 2.0 cannot subscript so
    _Rows: TypeAlias = Select[*tuple[Any, ...]]  # a select of rows of any shape


class _Step:
    """One kind of due work: which orders have some, and which (item, event) pairs to fire."""

    name = "step"

    def __init__(self, definitions: Mapping[str, CompiledProcess], now: datetime) -> None:
        self.compiled = definitions
        self.now = now

    def due(self) -> ColumnElement[bool]:
        raise NotImplementedError

    def due_order_ids(self) -> _Rows:
        """One row per due item, its order id first (the window query adds keyset and limit);
        what follows is for :meth:`weight`."""
        return select(OrderItem.order_id).where(self.due())

    def weight(self, row: Sequence[Any]) -> float:
        """How much of a batch one due row of :meth:`due_order_ids` takes."""
        return 1.0

    def due_window(self, session: Session, after: int, rows: int) -> tuple[list[_Due], bool]:
        """Orders after ``after`` with due items, in order, from at most ``rows`` due rows,
        and whether that was all there is (fewer rows came back)."""
        # On the connection: plain rows, without the ORM's result machinery (10,000 rows).
        found = session.connection().execute(
            self.due_order_ids()
            .where(OrderItem.order_id > after)
            .order_by(OrderItem.order_id)
            .limit(rows)
        ).all()
        window: list[_Due] = []
        for row in found:
            weight = self.weight(row)
            if window and window[-1].order_id == row[0]:
                window[-1].items += 1
                window[-1].weight += weight
            else:
                window.append(_Due(row[0], 1, weight))
        return window, len(found) < rows

    def due_items(self, session: Session, order_ids: Sequence[int]) -> list[DueItem]:
        """What is due in ``order_ids`` (leased), by item id. Asks by ``order_id`` only and
        decides in Python (see the module docstring)."""
        raise NotImplementedError


@dataclass
class _Due:
    """One order of a window: its due items seen and their weight (see ``PLAIN_WEIGHT``)."""

    order_id: int
    items: int
    weight: float


class DueItem(NamedTuple):
    """One item to fire ``event`` for (``None``: event-less), as plain values: the tick loads
    an ORM object only for items the runner has to handle."""

    id: int
    order_id: int
    process: str
    state: str
    event: str | None
    intent_id: int | None = None
    """The open gateway-call intent the item waits on: then nothing fires for it."""


class _Retries(_Step):
    name = "retries"

    def due(self) -> ColumnElement[bool]:
        return and_(OrderItem.retry_at <= self.now, OrderItem.process.in_(list(self.compiled)))

    def due_items(self, session: Session, order_ids: Sequence[int]) -> list[DueItem]:
        due: list[DueItem] = []
        stale: list[int] = []
        for part in chunked(list(order_ids)):
            rows = session.connection().execute(
                select(
                    OrderItem.id,
                    OrderItem.order_id,
                    OrderItem.process,
                    OrderItem.state,
                    OrderItem.retry_at,
                    OrderItem.retry_event,
                    OrderItem.intent_id,
                ).where(id_in(OrderItem.order_id, part, session))
            )
            for item_id, order_id, process, state, retry_at, event, intent_id in rows:
                if retry_at is None or retry_at > self.now or process not in self.compiled:
                    continue
                definition = self.compiled[process].definition
                if event is None:
                    applies = definition.has_eventless(state)
                else:
                    applies = event in definition.events_from(state)
                if applies:
                    due.append(DueItem(item_id, order_id, process, state, event, intent_id))
                else:
                    stale.append(item_id)
        for part in chunked(stale):
            # The item left the state its event failed in some other way: nothing to retry.
            session.execute(
                update(OrderItem)
                .where(id_in(OrderItem.id, part, session))
                .values(retry_event=None, retry_at=None)
                .execution_options(synchronize_session=False)
            )
        due.sort()
        return due


class _Timeouts(_Step):
    name = "timeouts"

    def due(self) -> ColumnElement[bool]:
        return and_(
            EventTimeout.due_at <= self.now,
            EventTimeout.state == OrderItem.state,
            OrderItem.retry_at.is_(None),
            OrderItem.process.in_(list(self.compiled)),
        )

    def due_order_ids(self) -> _Rows:
        return (
            select(OrderItem.order_id)
            .join(EventTimeout, EventTimeout.item_id == OrderItem.id)
            .where(self.due())
        )

    def due_items(self, session: Session, order_ids: Sequence[int]) -> list[DueItem]:
        found: list[tuple[datetime, int, DueItem]] = []
        for part in chunked(list(order_ids)):
            rows = session.connection().execute(
                select(
                    OrderItem.id,
                    OrderItem.order_id,
                    OrderItem.process,
                    OrderItem.state,
                    OrderItem.retry_at,
                    OrderItem.intent_id,
                    EventTimeout.id,
                    EventTimeout.state,
                    EventTimeout.event,
                    EventTimeout.due_at,
                )
                .join(EventTimeout, EventTimeout.item_id == OrderItem.id)
                .where(id_in(OrderItem.order_id, part, session))
            )
            for row in rows:
                item_id, order_id, process, state, retry_at, intent_id = row[:6]
                t_id, t_state, event, due_at = row[6:]
                if (
                    due_at <= self.now
                    and t_state == state
                    and retry_at is None
                    and process in self.compiled
                ):
                    item = DueItem(item_id, order_id, process, state, event, intent_id)
                    found.append((due_at, t_id, item))
        chosen: dict[int, DueItem] = {}
        for _due_at, _t_id, item in sorted(found):
            # Two timeouts due at once: the earlier fires now; if the item stays, the other
            # fires on the next tick.
            if item.id in chosen:
                continue
            if item.event in self.compiled[item.process].definition.events_from(item.state):
                chosen[item.id] = item
        return [chosen[k] for k in sorted(chosen)]


class _StateStep(_Step):
    """Items resting in particular states of each process (on-enter or event-less)."""

    def __init__(self, definitions: Mapping[str, CompiledProcess], now: datetime) -> None:
        super().__init__(definitions, now)
        self.events: dict[tuple[str, str], str | None] = {}
        for name, compiled in definitions.items():
            for state in self._states_of(compiled):
                event = self._event_of(compiled, state)
                if event is not _NO_WORK:
                    self.events[(name, state)] = event
        self.states: dict[str, list[str]] = {name: [] for name in definitions}
        for name, state in self.events:
            self.states[name].append(state)
        self._weights = {
            (name, state): PLAIN_WEIGHT
            if definitions[name].plain_move(state, event) is not None
            else 1.0
            for (name, state), event in self.events.items()
        }

    def _states_of(self, compiled: CompiledProcess) -> list[str]:
        found: dict[str, None] = {}
        for t in compiled.definition.transitions:
            found.setdefault(t.source, None)
        return list(found)

    def _event_of(self, compiled: CompiledProcess, state: str) -> Any:
        raise NotImplementedError

    @property
    def empty(self) -> bool:
        return not self.events

    def due_order_ids(self) -> _Rows:
        return select(OrderItem.order_id, OrderItem.process, OrderItem.state).where(self.due())

    def weight(self, row: Sequence[Any]) -> float:
        return self._weights.get((row[1], row[2]), 1.0)

    def due(self) -> ColumnElement[bool]:
        return and_(_states_filter(self.states), OrderItem.retry_at.is_(None))

    def due_items(self, session: Session, order_ids: Sequence[int]) -> list[DueItem]:
        events = self.events
        due: list[DueItem] = []
        for part in chunked(list(order_ids)):
            rows = session.connection().execute(
                select(
                    OrderItem.id,
                    OrderItem.order_id,
                    OrderItem.process,
                    OrderItem.state,
                    OrderItem.retry_at,
                    OrderItem.intent_id,
                ).where(id_in(OrderItem.order_id, part, session))
            )
            for item_id, order_id, process, state, retry_at, intent_id in rows:
                key = (process, state)
                if retry_at is None and key in events:
                    due.append(DueItem(item_id, order_id, process, state, events[key], intent_id))
        due.sort()
        return due


_NO_WORK = object()


class _OnEnter(_StateStep):
    name = "on_enter"

    def _event_of(self, compiled: CompiledProcess, state: str) -> Any:
        event = compiled.definition.on_enter_event(state)
        return event.name if event is not None else _NO_WORK


class _EventLess(_StateStep):
    name = "eventless"

    def _event_of(self, compiled: CompiledProcess, state: str) -> Any:
        return None if compiled.definition.has_eventless(state) else _NO_WORK


@dataclass
class TickRunner:
    """Runs one tick; built by ``Engine.tick`` with the engine's parts."""

    sessions: sessionmaker[Session]
    compiled: Mapping[str, CompiledProcess]
    registry: PluginRegistry
    services: Mapping[str, Any]
    claims: Claims
    origin: Origin
    batch_size: int = DEFAULT_BATCH_SIZE
    _db_failures: int = field(default=0, init=False)

    def run(
        self,
        now: datetime,
        limit: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> TickResult:
        started = time.perf_counter()
        stats = RunStats()
        orders_seen: set[int] = set()
        processed = 0
        timeouts_fired = 0
        steps: list[_Step] = [_Retries(self.compiled, now), _Timeouts(self.compiled, now)]
        for state_step in (_OnEnter(self.compiled, now), _EventLess(self.compiled, now)):
            if not state_step.empty:
                steps.append(state_step)
        worker_lock = sqlite_worker_lock(self.sessions)
        if worker_lock is not None:
            worker_lock.acquire()  # SqliteWorkerBusyError while another worker ticks
        try:
            # First settle gateway calls whose answer was lost: their items wait on them.
            try:
                self._external(now, stats).reconcile_open()
            except SQLAlchemyError as exc:
                self._database_failed(stats, "reconciling open intents", exc)
            for step in steps:
                done_total = self._step(step, now, stats, limit, processed, orders_seen, progress)
                processed += done_total
                if step.name == "timeouts":
                    timeouts_fired += done_total
                if self._db_failures >= MAX_DB_FAILURES_IN_A_ROW:
                    log.error("tick stopped: the database failed %d batches in a row",
                              self._db_failures)
                    break
        finally:
            if worker_lock is not None:
                worker_lock.release()
        result = TickResult(
            items_moved=stats.items_moved,
            commands_run=stats.commands_run,
            errors=stats.errors,
            retries_scheduled=stats.retries_scheduled,
            timeouts_fired=timeouts_fired,
            orders_seen=len(orders_seen),
            duration_s=time.perf_counter() - started,
            error_messages=tuple(stats.error_messages),
        )
        log.info("%s", result.summary())
        return result

    def _step(
        self,
        step: _Step,
        now: datetime,
        stats: RunStats,
        limit: int | None,
        processed: int,
        orders_seen: set[int],
        progress: Callable[[int], None] | None,
    ) -> int:
        """Walk one step's due orders batch by batch; returns the items processed.

        A database failure (dropped connection, deadlock, serialisation failure) inside a
        batch rolls back that batch's one transaction and nothing else: its items stay as
        they were (no history, no retry — it was not their command that failed), the error is
        counted, and the tick goes on with the next batch on a fresh connection. The leases of
        the failed batch are released if the database lets us, else they simply expire.
        """
        done_total = 0
        after = 0
        window: deque[_Due] = deque()
        last_window = False
        while limit is None or processed + done_total < limit:
            room = None if limit is None else limit - processed - done_total
            if not window and not last_window:
                try:
                    with self.sessions() as session:
                        found, last_window = step.due_window(
                            session, after, self.batch_size * WINDOW_BATCHES
                        )
                except SQLAlchemyError as exc:
                    self._database_failed(stats, f"{step.name}: finding due orders", exc)
                    return done_total  # nothing to walk on; the next tick looks again
                window.extend(found)
                if found:
                    after = found[-1].order_id
            if not window:
                break
            order_ids: list[int] = []
            weight, items = 0.0, 0
            while window and (
                not order_ids or (weight < self.batch_size and (room is None or items < room))
            ):
                due = window.popleft()
                order_ids.append(due.order_id)
                weight += due.weight
                items += due.items
            try:
                claimed = self.claims.claim(order_ids)
            except SQLAlchemyError as exc:
                self._database_failed(stats, f"{step.name}: leasing orders", exc)
                if self._db_failures >= MAX_DB_FAILURES_IN_A_ROW:
                    return done_total
                continue
            if not claimed:
                continue
            before = _Marks.of(stats)
            try:
                done, orders = self._batch(
                    step, claimed, now, stats, limit, processed + done_total
                )
            except SQLAlchemyError as exc:
                # What the runner counted for this batch never happened: put the figures back.
                before.restore(stats)
                self._database_failed(
                    stats, f"{step.name}: batch of orders {claimed[0]}..{claimed[-1]}", exc
                )
                done, orders = 0, set()
            else:
                self._db_failures = 0
            finally:
                try:
                    self.claims.release(claimed)
                except SQLAlchemyError as exc:
                    log.warning("could not release %d leases (they expire): %s",
                                len(claimed), exc)
            if self._db_failures >= MAX_DB_FAILURES_IN_A_ROW:
                return done_total
            done_total += done
            orders_seen.update(orders)
            if progress is not None:
                progress(processed + done_total)
        return done_total

    def _external(self, now: datetime, stats: RunStats) -> ExternalCalls:
        return ExternalCalls(
            self.sessions, self.compiled, self.registry, self.services, self.origin,
            self.claims, now, stats,
        )

    def _database_failed(self, stats: RunStats, where: str, exc: SQLAlchemyError) -> None:
        """Count a batch the database threw away; the message names the step, not the SQL."""
        orig = getattr(exc, "orig", None) or exc
        first = (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]
        message = f"database error in {where} (batch rolled back): {type(orig).__name__}: {first}"
        log.error("%s", message)
        stats.errors += 1
        self._db_failures += 1
        stats.error_messages.append(message)

    def _batch(
        self,
        step: _Step,
        claimed: Sequence[int],
        now: datetime,
        stats: RunStats,
        limit: int | None,
        processed: int,
    ) -> tuple[int, set[int]]:
        with self.sessions() as session, session.begin():
            # Items waiting on an open gateway-call intent are settled by reconciliation only.
            due = [d for d in step.due_items(session, claimed) if d.intent_id is None]
            if limit is not None:
                due = _whole_orders(due, limit - processed)
            if not due:
                return 0, set()
            plain, fired = self._split(due)
            if plain:
                self._write_plain(session, plain, now, stats)
            deferred = self._fire(session, fired, now, stats) if fired else []
        # The batch is committed; now the external calls it deferred, under the same leases.
        self._external(now, stats).run(deferred)
        return len(due), {d.order_id for d in due}

    def _split(
        self, due: Sequence[DueItem]
    ) -> tuple[list[tuple[DueItem, TransitionDef]], list[DueItem]]:
        """Plain moves (see ``CompiledProcess.plain_move``) and items the runner must fire.

        An order goes one way or the other as a whole: the runner fires all groups of an order
        before it writes their moves, and a command of one group must see the order's other
        items as they were, not half moved by the plain path.
        """
        moves = [(d, self.compiled[d.process].plain_move(d.state, d.event)) for d in due]
        mixed = {d.order_id for d, t in moves if t is None}
        plain = [(d, t) for d, t in moves if t is not None and d.order_id not in mixed]
        fired = [d for d in due if d.order_id in mixed]
        return plain, fired

    def _write_plain(
        self,
        session: Session,
        plain: Sequence[tuple[DueItem, TransitionDef]],
        now: datetime,
        stats: RunStats,
    ) -> None:
        """Write plain moves set-based from the ids alone: the same rows the runner writes
        (state, cleared retry, history, transition log, timeouts), no ORM object loaded."""
        groups: dict[MoveKey, list[int]] = defaultdict(list)
        for d, t in plain:
            groups[MoveKey(d.process, d.state, t.target, d.event, None, t.condition)].append(d.id)
        definitions = {name: c.definition for name, c in self.compiled.items()}
        StateWriter(session, now, self.origin).write_grouped_moves(groups, definitions)
        stats.items_moved += len(plain)
        stats.moves.extend((d.id, d.state, t.target) for d, t in plain)

    def _fire(
        self, session: Session, fired: Sequence[DueItem], now: datetime, stats: RunStats
    ) -> list[Deferred]:
        """Load ``fired`` as ORM objects with their orders and let the runner fire them;
        returns the external calls it deferred until the batch has committed."""
        items: dict[int, OrderItem] = {}
        for part in chunked([d.id for d in fired]):
            items.update(
                (i.id, i)
                for i in session.scalars(
                    select(OrderItem).where(id_in(OrderItem.id, part, session))
                )
            )
        pairs = [(items[d.id], d.event) for d in fired if d.id in items]
        orders: dict[int, Order] = {}
        for part in chunked(sorted({d.order_id for d in fired})):
            orders.update(
                (o.id, o)
                for o in session.scalars(select(Order).where(id_in(Order.id, part, session)))
            )
        runner = Runner(
            session, self.compiled, self.registry, self.services, now, self.origin, stats
        )
        runner.run(group_items(pairs, orders))
        return runner.deferred


@dataclass(frozen=True)
class _Marks:
    """Where ``stats`` stood before a batch: counters and list lengths (the lists only grow,
    so cutting them back undoes a batch; copying them per batch made a bulk tick quadratic)."""

    counters: tuple[int, int, int, int]
    lengths: tuple[int, int, int]

    _COUNTERS = ("items_moved", "commands_run", "errors", "retries_scheduled")
    _LISTS = ("moves", "stayed", "error_messages")

    @classmethod
    def of(cls, stats: RunStats) -> _Marks:
        c = stats.items_moved, stats.commands_run, stats.errors, stats.retries_scheduled
        return cls(c, (len(stats.moves), len(stats.stayed), len(stats.error_messages)))

    def restore(self, stats: RunStats) -> None:
        for name, value in zip(self._COUNTERS, self.counters, strict=True):
            setattr(stats, name, value)
        for name, length in zip(self._LISTS, self.lengths, strict=True):
            del getattr(stats, name)[length:]


def _whole_orders(due: list[DueItem], room: int) -> list[DueItem]:
    """At most ``room`` items without splitting an order (but at least one order)."""
    if len(due) <= room:
        return due
    by_order: dict[int, list[DueItem]] = {}
    for d in due:
        by_order.setdefault(d.order_id, []).append(d)
    kept: list[DueItem] = []
    for group in by_order.values():
        if kept and len(kept) + len(group) > room:
            break
        kept.extend(group)
    return kept
