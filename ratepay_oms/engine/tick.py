"""The tick: everything periodic, in order, in batches, one leased order at a time.

Four kinds of due work, done in this order so that one tick settles what the previous steps
started: (1) retries whose time has come, (2) timeouts that are due, (3) items resting in a
state that has an on-enter event (a crash or a failure left them there), (4) items in a state
with event-less transitions (their conditions are polled). Items with a retry scheduled are
left to step 1, so a failing timeout or on-enter command is retried with backoff instead of on
every tick (Spryker's timeout check re-fires it every run).

Each step walks the due items in batches ordered by order id (keyset, not OFFSET). The order
ids come in *windows* of ``WINDOW_BATCHES`` batches' worth of due rows (:class:`_Windows`):
asked for ``ORDER BY order_id LIMIT n`` the database reads every due row through the
``(process, state)`` index for each window, so a step with more due rows than one window walks
order-id *ranges* through the ``order_id`` index instead, and memory stays bounded by one
window. A batch row-locks its orders first (skipping those another worker has), then works on
what is due *for the locked orders only* in the same transaction: what another worker
finished in the meantime is no longer due, so no command runs twice and nothing moves twice.

Orders whose due work in the on-enter or event-less step is all *plain* moves (a fixed
transition without command or condition that lands where no on-enter event waits:
``CompiledProcess.plain_move``) are moved set-based from their order ids, per (process,
state), by ``StateWriter.move_resting``: no item row is read into Python, a batch of 20,000
such items costs a lock query, a check for other due work and five or six statements
(``PLAIN_WEIGHT``). For the other orders the batch re-reads what is due by ``order_id`` alone
(the database could otherwise pick the ``(process, state)`` index and read every waiting row
of the process), writes their plain moves set-based from their ids, and loads ORM objects
only for the orders with other work, which it hands to the runner.

On SQLite (no row locks: a batch holds the database's write lock) a state step whose due rows
are many and dense in order id first moves its plain moves range by range
(:meth:`TickRunner._move_ranges`): the statements name an order-id range, skipping leased
orders and orders with work for the runner, so no per-order window is read into Python and no
list of ids travels back; the window walk then finds only what the ranges left.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    exists,
    false,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value

from ratepay_oms.engine.claims import LeaseKeeper, sqlite_worker_lock
from ratepay_oms.engine.clock import retry_delay, wall_now
from ratepay_oms.engine.compiler import CompiledProcess
from ratepay_oms.engine.context import EngineContext
from ratepay_oms.engine.drive import CallPool, Drive, by_order
from ratepay_oms.engine.intents import RECONCILE_BATCH, due_for_reconciliation, reconcile_due
from ratepay_oms.engine.persist import (
    MoveKey,
    by_order_only,
    chunked,
    id_in,
    ids_clause,
    ids_style,
    ids_value,
    prebuilt,
    ranged_moves,
)
from ratepay_oms.engine.plugins import UnknownPluginError
from ratepay_oms.engine.runner import Call, Group, LoopGuard, Runner, RunStats, group_items
from ratepay_oms.engine.views import TickResult
from ratepay_oms.persistence.models import (
    INTENT_PENDING,
    UTC_DATETIME,
    EventTimeout,
    Intent,
    Order,
    OrderItem,
)
from ratepay_oms.process.model import TransitionDef

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500
"""Due items per batch (a batch takes whole orders, so it can be a few more; plain moves
count less, see ``PLAIN_WEIGHT``)."""
PLAIN_WEIGHT = 0.025
"""What a due item with a plain move (``CompiledProcess.plain_move``) of the on-enter or
event-less step counts towards a batch: such items are moved by a few set-based statements
per batch whatever their number (:meth:`_StateStep.move_resting`), run no command and call
nobody, so forty times as many fit in the same short transaction, and the per-batch cost
(a transaction and its commit, a lock query, five statements) is spread over more items."""
WINDOW_BATCHES = 100
"""Batches' worth of due rows fetched by one window query (see the module docstring); two
and a half batches of plain moves."""
CANDIDATES_PER_SLOT = 4
"""Orders that will call the gateway a batch looks at per free call slot: it plans calls for
as many as there are slots and puts the rest back (row locks end with the transaction), so a
worker that finds its first candidates taken by other workers still finds work in the same
transaction."""
RESTING_CHUNK = 5000
"""Orders per set-based statement of plain moves (their ids are one parameter on PostgreSQL
and SQLite; MariaDB gets an ``IN`` list, well under its bind-parameter limit)."""
DENSE_SPAN = 4
"""Items of a step's due order-id span per due row up to which SQLite moves the span's plain
moves range by range (:meth:`TickRunner._move_ranges`): each statement then reads at most
this many rows per item it moves."""
MAX_DB_FAILURES_IN_A_ROW = 3
"""A tick gives up after this many batches in a row failed in the database (it is down)."""


def _states_filter(states_by_process: Mapping[str, Sequence[str]]) -> ColumnElement[bool]:
    clauses = [
        and_(OrderItem.process == process, OrderItem.state.in_(states))
        for process, states in states_by_process.items()
        if states
    ]
    return or_(*clauses) if clauses else false()


def _by_order_filter(states_by_process: Mapping[str, Sequence[str]]) -> ColumnElement[bool]:
    """Items resting in ``states_by_process`` without retry or open intent, for a statement
    that also picks them by order id: in a form that leaves the ``order_id`` index the only
    one to use (:func:`~ratepay_oms.engine.persist.by_order_only`)."""
    process, state = by_order_only(OrderItem.process), by_order_only(OrderItem.state)
    clauses = [
        and_(process == name, state.in_(states))
        for name, states in states_by_process.items()
        if states
    ]
    return and_(
        or_(*clauses) if clauses else false(),
        by_order_only(OrderItem.retry_at).is_(None),
        by_order_only(OrderItem.intent_id).is_(None),
    )


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

    def any_due(self, now: ColumnElement[datetime]) -> ColumnElement[bool]:
        """Whether the step has any due row: for the tick's one probe (:func:`_due_probe`),
        which lets an idle tick skip the step's window queries and their connections. The
        same condition as :meth:`due`, with only its selective columns left to an index
        (:func:`~ratepay_oms.engine.persist.by_order_only`): unanalysed, SQLite would take
        the one on ``intent_id`` for ``intent_id IS NULL`` and read every item at rest."""
        raise NotImplementedError

    def due_order_ids(self) -> _Rows:
        """One row per due item, its order id first (the window query adds keyset and limit);
        what follows is for :meth:`weight`."""
        return select(OrderItem.order_id).where(self.due())

    def weight(self, row: Sequence[Any]) -> float:
        """How much of a batch one due row of :meth:`due_order_ids` takes."""
        return 1.0

    def calls_out(self, row: Sequence[Any]) -> bool:
        """Whether one due row of :meth:`due_order_ids` will call the gateway (as far as the
        step can tell from the row; the batch checks again when it fires)."""
        return False

    def plan_ranges(self, session: Session, rows: int) -> tuple[int, int, int] | None:
        """Lowest and highest order id with due items and the number of due rows, if the
        step walks order-id ranges and there are more than ``rows`` (see :class:`_Windows`)."""
        return None

    def due_order_ids_in_range(self) -> _Rows:
        """:meth:`due_order_ids` for a range of order ids (see :class:`_Windows`), one row
        per order and (process, state) with the number of due items last: the database
        counts them, so Python handles a quarter of the rows for orders of four items."""
        raise NotImplementedError

    def due_window(
        self, session: Session, after: int, rows: int, *, upto: int | None = None
    ) -> tuple[list[_Due], bool]:
        """Orders after ``after`` (up to ``upto``) with due items, in order, from at most
        ``rows`` due rows, and whether that was all there is (fewer rows came back)."""
        if upto is None:
            query = self.due_order_ids().where(OrderItem.order_id > after)
        else:
            query = self.due_order_ids_in_range().where(
                OrderItem.order_id > after, OrderItem.order_id <= upto
            )
        # On the connection: plain rows, without the ORM's result machinery.
        found = session.connection().execute(
            query.order_by(OrderItem.order_id).limit(rows)
        )
        window: list[_Due] = []
        count = 0
        grouped = upto is not None
        for row in found:  # row by row: a list of all of them would double the peak memory
            count += 1
            n = row[3] if grouped else 1
            weight = self.weight(row) * n
            calls = self.calls_out(row)
            key = self.resting_key(row)
            if window and window[-1].order_id == row[0]:
                due = window[-1]
                due.items += n
                due.weight += weight
                due.calls = due.calls or calls
                if key is None:
                    due.keys = ()
                elif due.keys and key not in due.keys:
                    due.keys = (*due.keys, key)
            else:
                window.append(_Due(row[0], n, weight, calls, (key,) if key else ()))
        if window and count == rows:
            # The last order may have more due rows than the window saw: no shortcut for it.
            window[-1].keys = ()
        return window, count < rows

    def resting_key(self, row: Sequence[Any]) -> tuple[str, str] | None:
        """The (process, state) of a due row of :meth:`due_order_ids` if the step moves it
        set-based (:meth:`_StateStep.move_resting`), else ``None``."""
        return None

    def due_items(
        self, session: Session, order_ids: Sequence[int], sizes: dict[int, int] | None = None
    ) -> list[DueItem]:
        """What is due in ``order_ids`` (leased), by item id. Asks by ``order_id`` only and
        decides in Python (see the module docstring). A step that reads every item of the
        orders counts them per order into ``sizes`` (the others leave it alone)."""
        raise NotImplementedError


@dataclass(slots=True)
class _Due:
    """One order of a window: its due items seen and their weight (see ``PLAIN_WEIGHT``)."""

    order_id: int
    items: int
    weight: float
    calls: bool = False
    """Some due item of the order will call the gateway."""
    keys: tuple[tuple[str, str], ...] = ()
    """The (process, state) of its due items seen, if every one of them is a plain move of a
    step that writes those set-based (:meth:`_StateStep.move_resting`); else empty."""


class _Windows:
    """A step's due orders, one window of at most ``rows`` due rows at a time, in order id.

    A window asks for the due rows after the last order seen, ``ORDER BY order_id LIMIT
    rows``; the database reads *every* due row for that (the ``(process, state)`` index does
    not give them in order id), so walking D due rows costs D²/rows reads: fine for a few
    thousand, minutes for 400,000. So when a step finds more due rows than one window holds
    (one ``count`` over the same index first), its windows are order-id *ranges* instead,
    sized from that count to hold about ``rows`` due rows each, and read through the
    ``order_id`` index (:meth:`_StateStep.due_in_range`): each item of the range is read
    once, so the whole walk costs one pass over the due orders' span, not D²/rows. A range
    that still holds more than ``rows`` due rows is cut at ``rows`` (the next window
    starts after its last order, as in the first mode) and the ranges shrink; ranges that
    find little grow."""

    def __init__(self, step: _Step, rows: int) -> None:
        self.step = step
        self.rows = rows
        self.after = 0
        self.done = False
        self._span: int | None = None
        self._high = 0
        self._planned = False

    def next(self, session: Session) -> list[_Due]:
        if not self._planned:
            self._planned = True
            planned = self.step.plan_ranges(session, self.rows)
            if planned is not None:
                low, self._high, count = planned
                self.after = low - 1
                self._span = max(1, (self._high - low + 1) * self.rows * 3 // (4 * count))
        if self._span is None:
            found, self.done = self.step.due_window(session, self.after, self.rows)
            if found:
                self.after = found[-1].order_id
            return found
        upto = min(self.after + self._span, self._high)
        found, complete = self.step.due_window(session, self.after, self.rows, upto=upto)
        if complete:
            self.after = upto
            self.done = upto >= self._high
            if sum(d.items for d in found) < self.rows // 4:
                self._span *= 2
        else:
            self.after = found[-1].order_id
            self._span = max(1, self._span // 2)
        return found


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
        return and_(
            OrderItem.retry_at <= self.now,
            OrderItem.intent_id.is_(None),
            OrderItem.process.in_(list(self.compiled)),
        )

    def any_due(self, now: ColumnElement[datetime]) -> ColumnElement[bool]:
        return exists(
            select(OrderItem.id).where(
                OrderItem.retry_at <= now,
                by_order_only(OrderItem.intent_id).is_(None),
                by_order_only(OrderItem.process).in_(list(self.compiled)),
            )
        )

    def due_items(
        self, session: Session, order_ids: Sequence[int], sizes: dict[int, int] | None = None
    ) -> list[DueItem]:
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
            OrderItem.intent_id.is_(None),
            OrderItem.process.in_(list(self.compiled)),
        )

    def due_order_ids(self) -> _Rows:
        return (
            select(OrderItem.order_id)
            .join(EventTimeout, EventTimeout.item_id == OrderItem.id)
            .where(self.due())
        )

    def any_due(self, now: ColumnElement[datetime]) -> ColumnElement[bool]:
        return exists(
            select(EventTimeout.id)
            .join(OrderItem, OrderItem.id == EventTimeout.item_id)
            .where(
                EventTimeout.due_at <= now,
                EventTimeout.state == by_order_only(OrderItem.state),
                by_order_only(OrderItem.retry_at).is_(None),
                by_order_only(OrderItem.intent_id).is_(None),
                by_order_only(OrderItem.process).in_(list(self.compiled)),
            )
        )

    def due_items(
        self, session: Session, order_ids: Sequence[int], sizes: dict[int, int] | None = None
    ) -> list[DueItem]:
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
        self._calling = {
            (name, state)
            for (name, state), event in self.events.items()
            if definitions[name].calls_out(state, event)
        }
        self.plain: dict[tuple[str, str], MoveKey] = {}
        for (name, state), event in self.events.items():
            t = definitions[name].plain_move(state, event)
            if t is not None:
                self.plain[(name, state)] = MoveKey(name, state, t.target, event, None, t.condition)
        self._fired: dict[str, list[str]] = {name: [] for name in definitions}
        for name, state in self.events:
            if (name, state) not in self.plain:
                self._fired[name].append(state)

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

    def calls_out(self, row: Sequence[Any]) -> bool:
        return (row[1], row[2]) in self._calling

    def resting_key(self, row: Sequence[Any]) -> tuple[str, str] | None:
        key = (row[1], row[2])
        return key if key in self.plain else None

    def due(self) -> ColumnElement[bool]:
        return and_(
            _states_filter(self.states),
            OrderItem.retry_at.is_(None),
            OrderItem.intent_id.is_(None),
        )

    def any_due(self, now: ColumnElement[datetime]) -> ColumnElement[bool]:
        return exists(
            select(OrderItem.id).where(
                _states_filter(self.states),
                by_order_only(OrderItem.retry_at).is_(None),
                by_order_only(OrderItem.intent_id).is_(None),
            )
        )

    def plan_ranges(self, session: Session, rows: int) -> tuple[int, int, int] | None:
        count, low, high = session.connection().execute(
            select(
                func.count(), func.min(OrderItem.order_id), func.max(OrderItem.order_id)
            ).where(self.due())
        ).one()
        return (int(low), int(high), int(count)) if count > rows else None

    def due_order_ids_in_range(self) -> _Rows:
        return (
            select(OrderItem.order_id, OrderItem.process, OrderItem.state, func.count())
            .where(_by_order_filter(self.states))
            .group_by(OrderItem.order_id, OrderItem.process, OrderItem.state)
        )

    def plan_dense(self, session: Session, rows: int) -> tuple[int, int, int] | None:
        """:meth:`plan_ranges`, if the step has plain moves and its due rows are dense in
        their order-id span (at most ``DENSE_SPAN`` items of the span per due row), so that
        statements walking the span's ``order_id`` index read few rows that are not due:
        then :meth:`move_range` can take the span range by range."""
        if not self.plain:
            return None
        planned = self.plan_ranges(session, rows)
        if planned is None:
            return None
        low, high, count = planned
        span_items = session.connection().execute(
            select(func.count()).where(OrderItem.order_id >= low, OrderItem.order_id <= high)
        ).scalar_one()
        return planned if span_items <= DENSE_SPAN * count else None

    def move_range(
        self, runner: Runner, low: int, high: int, held: Sequence[int]
    ) -> tuple[int, list[int]]:
        """Move set-based every plain-move item due in the orders with ids in ``(low, high]``
        (SQLite's write lock held) but those of ``held`` and those with due work for the
        runner (left for the step's window walk); returns the items moved and their orders,
        one per item. The range stands for the list of order ids a window would have read."""
        session = runner.session
        keys = sorted(self.plain)
        skip = set(held)
        if len(keys) > 1 or any(self._fired.values()):
            in_range = and_(OrderItem.order_id > low, OrderItem.order_id <= high)
            found = {
                (process, state)
                for process, state in session.connection().execute(
                    select(OrderItem.process, OrderItem.state)
                    .where(in_range, _by_order_filter(self.states))
                    .distinct()
                )
            }
            keys = sorted(k for k in found if k in self.plain)
            if any(k not in self.plain for k in found):
                skip.update(
                    session.connection().execute(
                        select(OrderItem.order_id)
                        .where(in_range, _by_order_filter(self._fired))
                        .distinct()
                    ).scalars()
                )
        definitions = {name: c.definition for name, c in self.compiled.items()}
        orders: list[int] = []
        for key in keys:
            orders += runner.writer.move_resting_range(
                low, high, sorted(skip), self.plain[key], definitions
            )
        return len(orders), orders

    def fired_orders(self, session: Session, order_ids: Sequence[int]) -> set[int]:
        """Which of ``order_ids`` have a due item the runner has to fire (not a plain move):
        the window saw none, but it may be stale."""
        if not any(self._fired.values()):
            return set()
        found: set[int] = set()
        filter_ = _by_order_filter(self._fired)
        for part in chunked(list(order_ids)):
            found.update(
                session.connection().execute(
                    select(OrderItem.order_id)
                    .where(id_in(OrderItem.order_id, part, session), filter_)
                    .distinct()
                ).scalars()
            )
        return found

    def move_resting(
        self, runner: Runner, order_ids: Sequence[int], keys: set[tuple[str, str]]
    ) -> int:
        """Move the items of ``order_ids`` (row-locked, none with work for the runner) that
        rest in one of ``keys`` (plain moves) set-based; returns how many moved."""
        moved = 0
        definitions = {name: c.definition for name, c in self.compiled.items()}
        for key in sorted(keys):
            for part in chunked(list(order_ids), RESTING_CHUNK):
                moved += runner.writer.move_resting(part, self.plain[key], definitions)
        return moved

    def loaded_due_items(
        self, session: Session, order_ids: Sequence[int], sizes: dict[int, int],
        loaded: Loaded,
    ) -> list[DueItem]:
        """:meth:`due_items` of orders whose gateway call is next, read as the objects
        :meth:`TickRunner._fire` fires (every item of the orders with its order, one
        statement) instead of as columns first and objects after (two): the objects go into
        ``loaded``, the count of each order's items into ``sizes``."""
        events = self.events
        due: list[DueItem] = []
        style = ids_style(session)
        statement = prebuilt("order items", style, _order_items_statement)
        for part in chunked(list(order_ids)):
            for item, order in session.execute(statement, {"ids": ids_value(part, style)}):
                loaded.items[item.id] = item
                loaded.orders[order.id] = order
                order_id = order.id
                sizes[order_id] = sizes.get(order_id, 0) + 1
                key = (item.process, item.state)
                if item.retry_at is None and key in events:
                    due.append(DueItem(item.id, order_id, item.process, item.state,
                                       events[key], item.intent_id))
        due.sort()
        return due

    def due_items(
        self, session: Session, order_ids: Sequence[int], sizes: dict[int, int] | None = None
    ) -> list[DueItem]:
        events = self.events
        due: list[DueItem] = []
        style = ids_style(session)
        statement = prebuilt("due items", style, _due_items_statement)
        conn = session.connection()
        for part in chunked(list(order_ids)):
            rows = conn.execute(statement, {"ids": ids_value(part, style)})
            for item_id, order_id, process, state, retry_at, intent_id in rows:
                key = (process, state)
                if retry_at is None and key in events:
                    due.append(DueItem(item_id, order_id, process, state, events[key], intent_id))
                if sizes is not None:
                    sizes[order_id] = sizes.get(order_id, 0) + 1
        due.sort()
        return due


def _due_items_statement(style: str) -> Any:
    """The item columns :meth:`_Step.due_items` reads, of the orders ``:ids`` (built once per
    ids style, see ``persist.prebuilt``: it runs in every batch)."""
    return select(
        OrderItem.id,
        OrderItem.order_id,
        OrderItem.process,
        OrderItem.state,
        OrderItem.retry_at,
        OrderItem.intent_id,
    ).where(ids_clause(OrderItem.order_id, style))


def _order_items_statement(style: str) -> Any:
    """Every item of the orders ``:ids`` with its order, as objects
    (:meth:`_StateStep.loaded_due_items`)."""
    return (
        select(OrderItem, Order)
        .join(Order, OrderItem.order_id == Order.id)
        .where(ids_clause(OrderItem.order_id, style))
    )


@dataclass(slots=True)
class Loaded:
    """Items and their orders a batch has read as objects already, by id."""

    items: dict[int, OrderItem] = field(default_factory=dict)
    orders: dict[int, Order] = field(default_factory=dict)


def _items_statement(style: str) -> Any:
    """The items ``:ids`` and their orders as objects (what :meth:`TickRunner._fire` loads;
    built once): one round trip, cheaper in the worker's CPU than items and orders apart
    (measured: about a quarter of a millisecond per order less, the order's columns repeated
    on each of its rows included)."""
    return (
        select(OrderItem, Order)
        .join(Order, OrderItem.order_id == Order.id)
        .where(ids_clause(OrderItem.id, style))
    )


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
    """Runs one tick; built by ``Engine.tick`` with the engine's context."""

    engine: EngineContext
    keeper: LeaseKeeper
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = 1
    _db_failures: int = field(default=0, init=False)

    def run(
        self,
        now: datetime,
        limit: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> TickResult:
        started = time.perf_counter()
        stats = _Counts()
        drive = Drive(self.engine, self.keeper, now, stats)
        orders_seen = _OrderSet()
        processed = 0
        timeouts_fired = 0
        compiled = self.engine.compiled
        steps: list[_Step] = [_Retries(compiled, now), _Timeouts(compiled, now)]
        for state_step in (_OnEnter(compiled, now), _EventLess(compiled, now)):
            if not state_step.empty:
                steps.append(state_step)
        worker_lock = sqlite_worker_lock(self.engine.sessions)
        if worker_lock is not None:
            worker_lock.acquire()  # SqliteWorkerBusyError while another worker ticks
        pool: CallPool | None = None
        try:
            # This thread's batches (and, without a pool, the chains they start) on one
            # connection (checked out by the first batch: an idle tick takes none).
            with drive.connected():
                try:
                    reconcile, *due_steps = _due_probe(self.engine.sessions, compiled, steps, now)
                except SQLAlchemyError as exc:
                    # The probe is only a shortcut: without it every step looks for itself.
                    self._database_failed(drive, "looking for due work", exc)
                    reconcile, due_steps = True, [True] * len(steps)
                # Skip what the probe found empty up to the first part with work; from there on
                # every later step runs as before, since earlier ones make work for later ones.
                started_work = reconcile
                if started_work or any(due_steps):
                    pool = CallPool(drive, self.concurrency) if self.concurrency > 1 else None
                # First settle gateway calls whose answer was lost: their items wait on them.
                if reconcile:
                    try:
                        self._reconcile_open(drive, pool)
                    except SQLAlchemyError as exc:
                        self._database_failed(drive, "reconciling open intents", exc)
                    if pool is not None:
                        pool.join()
                for step, has_due in zip(steps, due_steps, strict=True):
                    started_work = started_work or has_due
                    if not started_work:
                        continue
                    done_total = self._step(
                        step, drive, pool, limit, processed, orders_seen, progress
                    )
                    if pool is not None:
                        pool.join()  # one step's calls settle before the next step looks
                    processed += done_total
                    if step.name == "timeouts":
                        timeouts_fired += done_total
                    if self._db_failures >= MAX_DB_FAILURES_IN_A_ROW:
                        log.error("tick stopped: the database failed %d batches in a row",
                                  self._db_failures)
                        break
        finally:
            if pool is not None:
                pool.close()
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

    def _dispatch(self, drive: Drive, pool: CallPool | None, calls: Sequence[Call]) -> None:
        """Start the calls a committed transaction planned: on the pool, or here and now."""
        if not calls:
            return
        if pool is not None:
            pool.submit(calls)
            return
        for order_calls in by_order(calls).values():
            drive.chain(order_calls)

    # -- open intents ------------------------------------------------------------------------

    def _reconcile_open(self, drive: Drive, pool: CallPool | None) -> None:
        """Reconcile pending intents whose time has come and whose order nobody holds."""
        after = 0
        while True:
            with self.engine.sessions() as session:
                rows = due_for_reconciliation(session, after, RECONCILE_BATCH)
            if not rows:
                return
            after = rows[-1][0]
            for intent_id, order_id in rows:
                if pool is not None:
                    pool.wait_for_room()
                call = self._lease_for_reconciling(drive, intent_id, order_id)
                if call is not None:
                    self._dispatch(drive, pool, [call])

    def _lease_for_reconciling(self, drive: Drive, intent_id: int, order_id: int) -> Call | None:
        claims = self.engine.claims
        with self.engine.sessions() as session, session.begin():
            if not claims.lock(session, [order_id]):
                return None  # its worker is still at it, or another worker reconciles it
            intent = session.get(Intent, intent_id)
            if intent is None or intent.status != INTENT_PENDING:
                return None
            try:
                self.engine.registry.external(intent.command)
            except UnknownPluginError as exc:
                self._unknown_command(drive, session, intent, exc)
                return None  # not leased: the row lock ends with this transaction
            claims.lease_in(session, [order_id])
            return Call(intent_id, order_id, intent.command, json.loads(intent.summary))

    def _unknown_command(
        self, drive: Drive, session: Session, intent: Intent, exc: UnknownPluginError
    ) -> None:
        """An open intent whose command this engine does not know (its plugin was
        uninstalled, or a process file renamed the command while the call was open): only
        that command can ask the gateway what the call booked, so the intent waits. Reported
        as an error of the tick with what to do, and asked about again with backoff (as a
        failed status lookup is), not on every tick."""
        ref = session.scalar(select(Order.order_ref).where(Order.id == intent.order_id))
        intent.attempts = (intent.attempts or 0) + 1
        intent.last_error = f"cannot reconcile: {exc}"
        intent.reconcile_at = wall_now() + retry_delay(intent.attempts)
        drive.error(
            f"intent {intent.id} of order {ref or '#' + str(intent.order_id)}: {exc}, so the "
            f"call {intent.command!r} cannot be reconciled; install the plugin that registers "
            f"it (or restore the command's name in the process) and the tick reconciles it, "
            f"or, if RatePAY shows nothing booked, settle it by hand: ratepay-oms intents "
            f"resolve {intent.id} --not-booked (--booked applies the answer through the "
            f"command, so it needs the plugin too; next try in "
            f"{int(retry_delay(intent.attempts).total_seconds())} s)"
        )

    # -- due work ----------------------------------------------------------------------------

    def _step(
        self,
        step: _Step,
        drive: Drive,
        pool: CallPool | None,
        limit: int | None,
        processed: int,
        orders_seen: _OrderSet,
        progress: Callable[[int], None] | None,
    ) -> int:
        """Walk one step's due orders batch by batch; returns the items processed.

        A batch takes whole orders up to ``batch_size`` items, but no more orders that may
        call the gateway than ``CANDIDATES_PER_SLOT`` per free call slot (one slot without a
        pool). The transaction row-locks the batch's orders, skipping those another worker
        has (locked or leased), and plans calls for at most as many orders as there are free
        slots: an order is leased only when its call can start. Orders it did not get to are
        put back for the next batch.

        A database failure (dropped connection, deadlock, serialisation failure) inside a
        batch rolls back that batch's one transaction and nothing else: its items stay as
        they were (no history, no retry — it was not their command that failed), the error is
        counted, and the tick goes on with the next batch on a fresh connection.
        """
        done_total = 0
        if limit is None and isinstance(step, _StateStep) and self._ranged:
            # SQLite: the plain moves of a dense span first, range by range; the window walk
            # below then finds only what they left (orders with work for the runner, leased
            # orders).
            done_total = self._move_ranges(step, drive, processed, orders_seen, progress)
            if self._db_failures >= MAX_DB_FAILURES_IN_A_ROW:
                return done_total
        window: deque[_Due] = deque()
        windows = _Windows(step, self.batch_size * WINDOW_BATCHES)
        while limit is None or processed + done_total < limit:
            room = None if limit is None else limit - processed - done_total
            while not window and not windows.done:
                try:
                    with self.engine.sessions() as session:
                        window.extend(windows.next(session))
                except SQLAlchemyError as exc:
                    self._database_failed(drive, f"{step.name}: finding due orders", exc)
                    return done_total  # nothing to walk on; the next tick looks again
            if not window:
                break
            slots = pool.wait_for_room() if pool is not None else 1
            batch: dict[int, _Due] = {}
            weight, items, calling = 0.0, 0, 0
            while window and (
                not batch or (weight < self.batch_size and (room is None or items < room))
            ):
                due = window[0]
                if batch and due.calls and calling >= slots * CANDIDATES_PER_SLOT:
                    break
                window.popleft()
                batch[due.order_id] = due
                weight += due.weight
                items += due.items
                calling += due.calls
            try:
                done, orders, leftover, calls = self._batch(
                    step, drive, batch, slots, limit, processed + done_total
                )
            except SQLAlchemyError as exc:
                self._database_failed(
                    drive, f"{step.name}: batch of orders {min(batch)}..{max(batch)}", exc
                )
                if self._db_failures >= MAX_DB_FAILURES_IN_A_ROW:
                    return done_total
                continue
            self._db_failures = 0
            window.extendleft(reversed([batch[o] for o in leftover]))
            self._dispatch(drive, pool, calls)
            done_total += done
            orders_seen.update(orders)
            if progress is not None:
                progress(processed + done_total)
        return done_total

    @property
    def _ranged(self) -> bool:
        """Whether plain moves go range by range (:meth:`_move_ranges`): on SQLite."""
        bind = self.engine.sessions.kw.get("bind")
        return bind is not None and ranged_moves(bind.dialect)

    def _move_ranges(
        self,
        step: _StateStep,
        drive: Drive,
        processed: int,
        orders_seen: _OrderSet,
        progress: Callable[[int], None] | None,
    ) -> int:
        """SQLite: move the plain-move items of a step whose due rows are many and dense in
        order id (:meth:`_StateStep.plan_dense`) range by range, one transaction per range of
        about a batch of plain moves (``batch_size / PLAIN_WEIGHT`` items), without reading
        the due orders into Python: a window of per-order rows, the orders' ids sent back
        for the lock and for every statement cost more than the moves themselves. SQLite has
        no row locks: the transaction's write lock keeps every other writer out, and the
        orders somebody holds a lease on are skipped (:meth:`Claims.held_in_range`). Ranges
        that find little grow, ranges that find much shrink. Returns the items moved."""
        try:
            with self.engine.sessions() as session:
                planned = step.plan_dense(session, self.batch_size * WINDOW_BATCHES)
        except SQLAlchemyError as exc:
            self._database_failed(drive, f"{step.name}: planning ranges", exc)
            return 0
        if planned is None:
            return 0
        low, high, count = planned
        target = max(1, int(self.batch_size / PLAIN_WEIGHT))
        span = max(1, (high - low + 1) * target // count)
        claims = self.engine.claims
        after, done = low - 1, 0
        while after < high:
            upto = min(after + span, high)

            def work(runner: Runner, low: int = after, high: int = upto) -> tuple[int, list[int]]:
                held = claims.held_in_range(runner.session, low, high)
                moved, orders = step.move_range(runner, low, high, held)
                runner.stats.items_moved += moved
                return moved, orders

            try:
                (moved, orders), _calls = drive.transact(work, LoopGuard())
            except SQLAlchemyError as exc:
                # Its items stay due: the window walk after the ranges tries them again.
                self._database_failed(drive, f"{step.name}: orders {after + 1}..{upto}", exc)
                if self._db_failures >= MAX_DB_FAILURES_IN_A_ROW:
                    return done
                after = upto
                continue
            self._db_failures = 0
            after = upto
            done += moved
            orders_seen.update(orders)
            if progress is not None:
                progress(processed + done)
            if moved < target // 4:
                span *= 2
            elif moved > 2 * target:
                span = max(1, span // 2)
        return done

    def _database_failed(self, drive: Drive, where: str, exc: SQLAlchemyError) -> None:
        """Count a batch the database threw away; the message names the step, not the SQL."""
        self._db_failures += 1
        drive.database_failed(f"{where} (batch rolled back)", exc)

    def _batch(
        self,
        step: _Step,
        drive: Drive,
        batch: Mapping[int, _Due],
        slots: int,
        limit: int | None,
        processed: int,
    ) -> tuple[int, list[int], list[int], list[Call]]:
        """One transaction: lock what is free of the batch's orders; move the items of orders
        whose due work is all plain moves of a state step set-based from their orders
        (:meth:`_StateStep.move_resting`: no item row read into Python); for the others
        re-read what is due, write plain moves set-based from their ids and fire the rest
        (planning at most ``slots`` orders' calls). Returns items done, their orders, orders
        put back and the calls planned."""

        def work(runner: Runner) -> tuple[int, list[int], list[int]]:
            session = runner.session
            # Along with the lock: which orders have an open intent (a booking's hold check),
            # and (PostgreSQL) the lease of the orders that will likely get the call slots.
            calling = [o for o, d in batch.items() if d.calls]
            locked = self.engine.claims.lock(
                session, list(batch), runner.open_intents,
                lease=calling, slots=slots, leased=runner.leased,
            )
            moved, resting = 0, []
            if isinstance(step, _StateStep) and limit is None:
                # ``limit`` counts items exactly, so it takes the path that reads them.
                resting = [o for o in locked if batch[o].keys]
                if resting:
                    fired = step.fired_orders(session, resting)
                    resting = [o for o in resting if o not in fired]
                    keys = {k for o in resting for k in batch[o].keys}
                    moved = step.move_resting(runner, resting, keys)
                    runner.stats.items_moved += moved
                    fast = set(resting)
                    locked = [o for o in locked if o not in fast]
            locked, later = _beyond_slots(batch, locked, slots, runner.leased)
            # Items waiting on an open gateway-call intent are settled by reconciliation only.
            sizes: dict[int, int] = {}
            loaded = Loaded()
            if isinstance(step, _StateStep) and any(batch[o].calls for o in locked):
                # The orders whose call is next: read as the objects the runner fires.
                calling = [o for o in locked if batch[o].calls]
                found = step.loaded_due_items(session, calling, sizes, loaded)
                others = [o for o in locked if not batch[o].calls]
                if others:
                    found = sorted(found + step.due_items(session, others, sizes))
            else:
                found = step.due_items(session, locked, sizes)
            due = [d for d in found if d.intent_id is None]
            if limit is not None:
                due = _whole_orders(due, limit - processed)
            if not due:
                return moved, resting, later
            plain, fired_items = self._split(due)
            if plain:
                for d, _ in plain:  # moved from its id: its object would hold the old state
                    item = loaded.items.pop(d.id, None)
                    if item is not None:
                        session.expunge(item)
                self._write_plain(runner, plain)
            leftover = (
                self._fire(runner, fired_items, slots, sizes, loaded) if fired_items else []
            )
            if later:
                leftover = sorted(later + leftover)
            put_back = set(leftover)
            done = [d for d in due if d.order_id not in put_back]
            orders = dict.fromkeys(resting)
            orders.update(dict.fromkeys(d.order_id for d in done))
            return moved + len(done), list(orders), leftover

        (done, orders, leftover), calls = drive.transact(work, LoopGuard())
        return done, orders, leftover, calls

    def _split(
        self, due: Sequence[DueItem]
    ) -> tuple[list[tuple[DueItem, TransitionDef]], list[DueItem]]:
        """Plain moves (see ``CompiledProcess.plain_move``) and items the runner must fire.

        An order goes one way or the other as a whole: the runner fires all groups of an order
        before it writes their moves, and a command of one group must see the order's other
        items as they were, not half moved by the plain path.
        """
        compiled = self.engine.compiled
        moves = [(d, compiled[d.process].plain_move(d.state, d.event)) for d in due]
        mixed = {d.order_id for d, t in moves if t is None}
        plain = [(d, t) for d, t in moves if t is not None and d.order_id not in mixed]
        fired = [d for d in due if d.order_id in mixed]
        return plain, fired

    def _write_plain(
        self, runner: Runner, plain: Sequence[tuple[DueItem, TransitionDef]]
    ) -> None:
        """Write plain moves set-based from the ids alone: the same rows the runner writes
        (state, cleared retry, history, transition log, timeouts), no ORM object loaded."""
        groups: dict[MoveKey, list[int]] = defaultdict(list)
        for d, t in plain:
            groups[MoveKey(d.process, d.state, t.target, d.event, None, t.condition)].append(d.id)
        runner.writer.write_grouped_moves(groups, self.engine.definitions)
        runner.stats.items_moved += len(plain)
        runner.stats.moves.extend((d.id, d.state, t.target) for d, t in plain)

    def _fire(
        self, runner: Runner, fired: Sequence[DueItem], slots: int,
        sizes: Mapping[int, int] | None = None, loaded: Loaded | None = None,
    ) -> list[int]:
        """Let the runner fire ``fired``: the orders that cannot reach a gateway call all at
        once, then those that may, one by one, until ``slots`` orders have a call planned.
        Orders beyond the slots are put back before anything of them is loaded. Returns the
        orders not fired. ``sizes``: items per order, where known; an order whose items are
        all fired gets them as its loaded ``items`` (a command reading ``order.items``, the
        payment request's basket, does not load them again). ``loaded``: what the batch read
        as objects already (not read again)."""
        compiled = self.engine.compiled
        calling: list[int] = []
        for d in fired:
            if compiled[d.process].calls_out(d.state, d.event) and d.order_id not in calling:
                calling.append(d.order_id)
        if runner.leased:
            # Orders leased along with the lock go first: their lease is written already.
            calling.sort(key=lambda o: o not in runner.leased)
        leftover = calling[slots:]
        put_back = set(leftover)
        fired = [d for d in fired if d.order_id not in put_back]
        session = runner.session
        style = ids_style(session)
        statement = prebuilt("fired items", style, _items_statement)
        items: dict[int, OrderItem] = loaded.items if loaded is not None else {}
        orders: dict[int, Order] = loaded.orders if loaded is not None else {}
        for part in chunked([d.id for d in fired if d.id not in items]):
            for item, order in session.execute(statement, {"ids": ids_value(part, style)}):
                items[item.id] = item
                orders[order.id] = order
        if sizes:
            _whole_items(fired, items, orders, sizes)
        groups = group_items([(items[d.id], d.event) for d in fired if d.id in items], orders)
        by_order: dict[int, list[Group]] = {}
        quiet: list[Group] = []
        for g in groups:
            if g.order.id in calling:
                by_order.setdefault(g.order.id, []).append(g)
            else:
                quiet.append(g)
        if quiet:
            runner.run(quiet)
        for order_id in calling[:slots]:
            if order_id not in by_order:
                continue
            if len({c.order_id for c in runner.calls}) >= slots:
                leftover.append(order_id)
                continue
            runner.run(by_order[order_id])
        return leftover


def _beyond_slots(
    batch: Mapping[int, _Due], locked: list[int], slots: int, leased: Collection[int]
) -> tuple[list[int], list[int]]:
    """``locked`` without the orders the window says will call the gateway beyond the first
    ``slots`` of them (those leased along with the lock first), and those: put back before
    their items are read. A batch locks up to ``CANDIDATES_PER_SLOT`` such orders per slot
    so that it finds free ones among those other workers hold, and fires one per slot; the
    others' items were read, sorted and split only for :meth:`TickRunner._fire` to put them
    back (with one slot, three orders of four: most of a batch's reading). Should a kept
    order plan no call after all (the window's guess is stale), its slot stays free until
    the next batch; :meth:`TickRunner._fire` still limits the calls by what is planned."""
    calling = [o for o in locked if batch[o].calls]
    if len(calling) <= slots:
        return locked, []
    if leased:
        calling.sort(key=lambda o: o not in leased)  # stable: id order within each
    later = set(calling[slots:])
    return [o for o in locked if o not in later], sorted(later)


def _whole_items(
    fired: Sequence[DueItem],
    items: Mapping[int, OrderItem],
    orders: Mapping[int, Order],
    sizes: Mapping[int, int],
) -> None:
    """Set ``order.items`` (as loaded, by id like the relationship) of each order whose every
    item is in ``items``; the others keep a lazy collection."""
    mine: dict[int, list[OrderItem]] = defaultdict(list)
    for d in fired:
        item = items.get(d.id)
        if item is not None:
            mine[d.order_id].append(item)
    for order_id, its in mine.items():
        order = orders.get(order_id)
        if order is None or len(its) != sizes.get(order_id) or "items" in order.__dict__:
            continue
        set_committed_value(order, "items", sorted(its, key=lambda i: i.id))


def _due_probe(
    sessions: sessionmaker[Session],
    compiled: Mapping[str, CompiledProcess],
    steps: Sequence[_Step],
    now: datetime,
) -> list[bool]:
    """Whether any open intent is due for reconciliation, then whether each of ``steps`` has
    due work: one statement of ``EXISTS`` on one connection, each answered from an index
    (``status``, ``retry_at``, ``due_at``, ``(process, state)``). An idle tick costs this
    statement instead of a window query per step and a connection per query."""
    probe = _probe_statement(compiled, steps)
    with sessions() as session:
        row = session.connection().execute(probe, {"probe_now": now, "probe_wall": wall_now()})
        return [bool(v) for v in row.one()]


_PROBES: dict[tuple[Any, ...], tuple[tuple[CompiledProcess, ...], _Rows]] = {}
"""Probe statements by the processes and steps they ask about (building one costs more than
the idle tick's query). An entry holds its ``CompiledProcess`` objects, so their ids in the
key cannot be reused by others while it exists; a few engines per process at most."""
_MAX_PROBES = 16


def _probe_statement(
    compiled: Mapping[str, CompiledProcess], steps: Sequence[_Step]
) -> _Rows:
    key = (tuple((name, id(c)) for name, c in compiled.items()), tuple(s.name for s in steps))
    cached = _PROBES.get(key)
    if cached is not None:
        return cached[1]
    now = bindparam("probe_now", type_=UTC_DATETIME)
    statement = select(
        reconcile_due(bindparam("probe_wall", type_=UTC_DATETIME)),
        *(step.any_due(now) for step in steps),
    )
    if len(_PROBES) >= _MAX_PROBES:
        _PROBES.clear()
    _PROBES[key] = (tuple(compiled.values()), statement)
    return statement


class _Counts(RunStats):
    """The tick's figures: counts and error messages only. The per-item lists a manual event
    reports (moves, stays, failures) would grow with every item a bulk tick moves, and
    ``TickResult`` has no use for them."""

    def add(self, other: RunStats) -> None:
        # The counts by name (found once, below) instead of ``RunStats.add``'s walk over
        # every field and the lists it would extend only to clear them: three transactions
        # per order are added up.
        for name in _COUNTED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.error_messages.extend(other.error_messages)


_COUNTED = tuple(f.name for f in fields(RunStats) if f.default_factory is MISSING)
"""The fields of :class:`RunStats` that are counts (the others are lists)."""


class _OrderSet:
    """The distinct orders a tick worked on, one bit per order id: a set of 100,000 ints
    takes megabytes, this takes an eighth of the highest id in bytes."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self._count = 0

    def update(self, order_ids: Iterable[int]) -> None:
        bits = self._bits
        for order_id in order_ids:
            byte, bit = divmod(order_id, 8)
            if byte >= len(bits):
                bits.extend(bytes(byte - len(bits) + 1 + len(bits) // 2))
            mask = 1 << bit
            if not bits[byte] & mask:
                bits[byte] |= mask
                self._count += 1

    def __len__(self) -> int:
        return self._count


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
