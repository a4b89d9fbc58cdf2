"""One transaction of the drive loop: commands, conditions, moves, on-enter cascade, intents.

The order of work is Spryker's: items are grouped by (order, source state, event); a by-order
command runs once per group (a by-item command once per item); then each item's transition is
chosen (:meth:`Runner.choose`, the one place that does so); then the moves are written
set-based; then the on-enter events of the states the items landed in fire for them, grouped
again, until the items rest.

An :class:`ExternalCommand` (a RatePAY booking) only *plans* here: its ``plan`` reads the
database, the runner writes the intent row and marks the items as waiting on it, in this same
transaction, and hands the call back in :attr:`Runner.calls`. The drive loop
(``ratepay_oms.engine.drive``) commits, makes the call outside any transaction, and settles it
in a new transaction through :meth:`Runner.settle`, which continues the cascade.

Each in-transaction command (and each item's condition checks) runs inside a SAVEPOINT, so
a command that raises is rolled back alone: its items stay where they were with an error row
in the transition log and a retry scheduled with backoff, while the other groups of the same
transaction still commit. What a command wrote through ``ctx.session`` commits together with
the state change it led to.

An external command's ``plan`` runs without one inside ``Drive.transact`` (two statements
fewer per planned call): a plan touches only the database, and so does every unit of work
the drive runs, so a plan that raises rolls the whole transaction back and the drive runs the
same work again in a new one, that group's failure already known (:class:`Replan`): the
group is failed as a savepoint's rollback would have left it, without planning it again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Table, TextClause, bindparam, exists, insert, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, PendingRollbackError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state, set_committed_value

from ratepay_oms.engine.claims import riding_lease, riding_release
from ratepay_oms.engine.clock import retry_delay, wall_now
from ratepay_oms.engine.compiler import Subject
from ratepay_oms.engine.errors import BookingInDoubtError
from ratepay_oms.engine.persist import (
    CHUNK,
    MoveKey,
    Moves,
    StateWriter,
    chunked,
    ids_clause,
    ids_style,
    ids_value,
    prebuilt,
)
from ratepay_oms.engine.plugins import (
    ByItemCommand,
    ByOrderCommand,
    CommandContext,
    ExternalCommand,
    PreparedCall,
    Reconciled,
)
from ratepay_oms.persistence.held import Rider
from ratepay_oms.persistence.models import (
    INTENT_PENDING,
    INTENT_SETTLED,
    Intent,
    Order,
    OrderItem,
    intent_open,
)
from ratepay_oms.persistence.statements import execute_rowless

if TYPE_CHECKING:
    from ratepay_oms.engine.context import EngineContext
    from ratepay_oms.process.model import TransitionDef

log = logging.getLogger(__name__)

ITEMS = cast(Table, OrderItem.__table__)
EVENT_DATA_KEY = "event_data"
"""Key under which an intent's summary keeps the manual event's data until the call settles."""

MAX_EVENT_REPEATS = 10
"""How often one (order, state, event) may fire in one drive before the loop guard stops it."""

MAX_ERROR_LENGTH = 2000

HOLD_RECHECK = timedelta(minutes=1)
"""How soon items held behind an intent a person must decide look again (a person's resolve
lets them go at the latest this long after)."""

# How an intent was settled (``Intent.resolution``).
ANSWERED = "answered"
NOT_SENT = "not_sent"
RECONCILED_BOOKED = "reconciled_booked"
RECONCILED_NOT_BOOKED = "reconciled_not_booked"
RESOLVED_BOOKED = "resolved_booked"
RESOLVED_NOT_BOOKED = "resolved_not_booked"


@dataclass
class Group:
    """Items of one order that take the same event from the same state."""

    order: Order
    process: str
    state: str
    event: str | None
    items: list[OrderItem]


@dataclass(frozen=True)
class Call:
    """A gateway call the drive loop makes after the transaction that planned it commits:
    ``send`` of ``prepared`` (a new intent) or, with ``prepared`` ``None``, ``reconcile`` of
    an intent whose answer was lost."""

    intent_id: int
    order_id: int
    command: str
    summary: dict[str, Any]
    prepared: PreparedCall[Any] | None = None
    record_stays: bool = False
    stored: str | None = field(default=None, compare=False, repr=False)
    """The intent's summary as this transaction wrote it (JSON), when it planned the call:
    ``remember`` merges facts into it without reading the row back."""
    loaded: Loaded | None = field(default=None, compare=False, repr=False)
    """The order and the items the plan marked, as its transaction committed them: the
    settle takes them up again instead of reading them back (see :meth:`Runner.settle`)."""


@dataclass(frozen=True)
class Loaded:
    """An order and the items of one intent, loaded in the transaction that planned it."""

    order: Order
    items: tuple[OrderItem, ...]


@dataclass
class RunStats:
    """What one or more transactions did; the engine turns it into a Trigger- or TickResult."""

    items_moved: int = 0
    commands_run: int = 0
    errors: int = 0
    retries_scheduled: int = 0
    moves: list[tuple[int, str, str]] = field(default_factory=list)
    stayed: list[int] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    """(item id, error message) of every item whose event failed (bulk events report per item)."""
    held: list[tuple[int, str]] = field(default_factory=list)
    """(item id, why) of every item whose booking waits for another booking of its order that
    is in doubt: not a failure, the tick fires it again once that one is settled."""

    def add(self, other: RunStats) -> None:
        """Add what ``other`` (a committed transaction's figures) counted. Field by field,
        not through ``dataclasses.fields``: that walk (a ``getattr``, an ``isinstance`` and
        a ``setattr`` per field) ran after every transaction of every order (a test keeps
        this list complete)."""
        self.items_moved += other.items_moved
        self.commands_run += other.commands_run
        self.errors += other.errors
        self.retries_scheduled += other.retries_scheduled
        if other.moves:
            self.moves.extend(other.moves)
        if other.stayed:
            self.stayed.extend(other.stayed)
        if other.error_messages:
            self.error_messages.extend(other.error_messages)
        if other.failed:
            self.failed.extend(other.failed)
        if other.held:
            self.held.extend(other.held)

    def error(self, message: str) -> None:
        self.errors += 1
        self.error_messages.append(message)


class LoopGuard:
    """The one loop guard: how often each (order, state, event) fired in one drive."""

    def __init__(self) -> None:
        # A plain dict, not a ``Counter``: one is copied per transaction (``checkpoint``),
        # and a Counter's copy goes through its ``__init__`` and ``update``.
        self._seen: dict[tuple[int, str, str | None], int] = {}

    def allow(self, order_id: int, state: str, event: str | None) -> bool:
        key = (order_id, state, event)
        seen = self._seen.get(key, 0) + 1
        self._seen[key] = seen
        return seen <= MAX_EVENT_REPEATS

    def fired(self, order_id: int, state: str, event: str | None) -> int:
        """How often (order, state, event) fired so far in this drive."""
        return self._seen.get((order_id, state, event), 0)

    def checkpoint(self) -> dict[tuple[int, str, str | None], int]:
        """The counts now, for :meth:`restore` when the transaction that counts on is re-run
        (only a committed transaction's firings count)."""
        return self._seen.copy()

    def restore(self, checkpoint: dict[tuple[int, str, str | None], int]) -> None:
        self._seen = checkpoint.copy()


REPLANS = 3
"""How many failing plans one transaction learns by re-running (see :class:`Replan`); the
attempt after that puts a savepoint around each plan still unknown, as every plan had before."""

PlanKey = tuple[str, str, str, str | None, str, int, int]
"""(order ref, process, state, event, command, how often the guard had counted that order,
state and event when it was planned, how many items): the same plan in a re-run of the same
work. By the order's ref, not its id, and not by item ids: an order placed in the transaction
gets new ids in the re-run (PostgreSQL does not take back sequence values). Should a re-run's
group differ all the same (another worker got to the order between the attempts), failing it
unplanned is still safe: its items wait for a retry, nothing is sent."""


class PlanFailed(Exception):
    """A plan raised in a transaction that runs plans without a savepoint: ``Drive.transact``
    rolls the transaction back and runs its work again with this failure known."""

    def __init__(self, key: PlanKey, error: Exception) -> None:
        super().__init__(describe_error(error))
        self.key = key
        self.error = error


@dataclass
class Replan:
    """How a runner inside ``Drive.transact`` plans: without a savepoint (``savepoints``
    false), failing the plans ``known`` to raise without running them again.

    Why that is the same as a savepoint around each plan: a plan only reads and writes the
    database, and the work the drive runs is database-only too, so rolling the whole
    transaction back and running the work again reaches the same groups with the same data;
    a group whose plan raised before is then failed with that very error (same message,
    retry and log rows) as the savepoint's rollback would have left it."""

    known: dict[PlanKey, Exception]
    savepoints: bool = False
    failed: PlanFailed | None = None
    """The plan that raised in this attempt (set even if something swallowed the raise:
    the drive then still rolls back instead of committing half a plan)."""


def group_items(
    pairs: Iterable[tuple[OrderItem, str | None]], orders: Mapping[int, Order]
) -> list[Group]:
    """Group (item, event) pairs by (order, process, state, event), keeping first-seen order."""
    groups: dict[tuple[int, str, str, str | None], Group] = {}
    for item, event in pairs:
        key = (item.order_id, item.process, item.state, event)
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(orders[item.order_id], item.process, item.state, event, [])
        group.items.append(item)
    return list(groups.values())


def database_lost(exc: BaseException) -> bool:
    """The connection or the transaction is gone (dropped, killed, deadlock victim): not the
    command's fault, and nothing more can be written in this transaction. The caller re-raises
    so the whole transaction rolls back and is counted as a database failure."""
    return isinstance(exc, OperationalError | InterfaceError | PendingRollbackError) or bool(
        getattr(exc, "connection_invalidated", False)
    )


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:MAX_ERROR_LENGTH]


class HeldRowsRefused(Exception):
    """The database refused the held rows a settle's compare-and-set carried
    (:meth:`Runner.settle`): ``Drive.transact`` rolls back and settles again without them."""


class Runner:
    """One unit of work over an open session (built by the drive loop, one per transaction)."""

    def __init__(
        self,
        engine: EngineContext,
        session: Session,
        now: datetime,
        guard: LoopGuard,
        stats: RunStats | None = None,
    ) -> None:
        self.engine = engine
        self.session = session
        self.now = now
        self.guard = guard
        self.stats = stats if stats is not None else RunStats()
        self.writer = StateWriter(session, now, engine.origin)
        self.calls: list[Call] = []
        """Gateway calls planned in this transaction (their intents are written)."""
        self.data: dict[str, Any] | None = None
        """Event data of a manual trigger: given to the first round's commands and written on
        the history rows of its moves (also after a gateway call, through the intent)."""
        self._first_round = False
        self.leased: set[int] = set()
        """Orders this transaction leased ahead of planning their call (the tick's lock,
        ``Claims.lock``): ``Drive.transact`` writes no lease for them again and drops the
        lease of those that end up without a call."""
        self.replan: Replan | None = None
        """Set by ``Drive.transact``: plans run without a savepoint (see :class:`Replan`).
        ``None`` (a runner built elsewhere): a savepoint around each plan."""
        self.rider: Rider | None = None
        """Set by ``Drive.transact``: held rows for the first settle's compare-and-set to
        carry (then ``None`` again)."""
        self.release_with_settle: int | None = None
        """Set by ``Drive.transact``: the order whose lease the first settle's
        compare-and-set drops where it can carry that (PostgreSQL), the order of a chain's last
        call; it lands in :attr:`released` then."""
        self.released: set[int] = set()
        """Orders whose lease a statement of this transaction dropped already."""
        self._two_hops_here: bool | None = None
        self.leased_with_intent: set[int] = set()
        """Orders whose lease a planned call's intent INSERT wrote (PostgreSQL)."""
        self.open_intents: dict[int, bool] = {}
        """Whether an order has an open intent, where a statement of this transaction read it
        along (the tick's lock, a settle's compare-and-set) or this runner wrote one: a
        booking's hold check (:meth:`_held`) asks the database only for orders not in here.
        Nobody else writes an intent of an order meanwhile: that takes the order's row lock
        (held to the end of this transaction) or its lease (ours while we settle)."""

    # -- the cascade ---------------------------------------------------------------------

    def run(self, groups: Sequence[Group], *, record_stays: bool = False) -> None:
        """Fire ``groups``, then the on-enter events of wherever their items land.

        ``record_stays``: remember items of the *first* round that stayed (manual triggers
        report them); cascade rounds only ever start from items that moved.
        """
        self._rounds(list(groups), [], record_stays=record_stays)

    def finish(self) -> None:
        """Write what is buffered (transition-log rows) without firing anything."""
        self.writer.flush_log()
        self.session.flush()

    def _rounds(self, pending: list[Group], carried: list[Moves], *, record_stays: bool) -> None:
        first = True
        while pending or carried:
            moves: list[Moves] = carried
            carried = []
            self._first_round = first
            for group in pending:
                if not self.guard.allow(group.order.id, group.state, group.event):
                    self._loop_guard(group)
                    continue
                moves.extend(self._fire(group, record_stays=record_stays and first))
            self._first_round = False
            data = self.data if first else None
            if moves and not data and self._two_hops:
                moves = self._passed_on(moves)
            self.writer.write_moves(moves, self.engine.definitions, data=data)
            for run in moves:
                for key in (run.key, run.then):
                    if key is None:
                        continue
                    self.stats.items_moved += len(run.items)
                    self.stats.moves.extend([(i.id, key.source, key.target) for i in run.items])
            pending = self._on_enter_groups(moves)
            first = False
        self.finish()

    @property
    def _two_hops(self) -> bool:
        """Whether a move and the move on out of a state passed through are written as one
        (:meth:`_passed_on`): where the database writes both in one statement."""
        found = self._two_hops_here
        if found is None:
            found = self._two_hops_here = self.session.get_bind().dialect.name == "postgresql"
        return found

    def _passed_on(self, moves: list[Moves]) -> list[Moves]:
        """``moves`` with each run that lands in a state it only passes through
        (``CompiledProcess.passes_on``) taking the next transition at once (``Moves.then``):
        what the next round would do for it, firing the on-enter event through the same loop
        guard (once per order, state and event, as a round's group), one statement fewer."""
        compiled = self.engine.compiled
        allowed: dict[tuple[int, str, str], bool] = {}
        out: list[Moves] = []
        for run in moves:
            key = run.key
            onward = compiled[key.process].passes_on(key.target) if key.forced is None else None
            if onward is None:
                out.append(run)
                continue
            event, transition = onward
            fired = (run.order.id, key.target, event)
            ok = allowed.get(fired)
            if ok is None:
                ok = allowed[fired] = (
                    self.guard.fired(*fired) < MAX_EVENT_REPEATS and self.guard.allow(*fired)
                )
            if not ok:  # the next round meets the loop guard and says so
                out.append(run)
                continue
            then = MoveKey(key.process, key.target, transition.target, event)
            out.append(Moves(key, run.order, run.items, then))
        return out

    def _on_enter_groups(self, moves: Sequence[Moves]) -> list[Group]:
        """The next round: the moved items grouped by (order, process, state, on-enter event)
        as :func:`group_items` groups them, but a run at a time (its items share all four)."""
        groups: dict[tuple[int, str, str, str], Group] = {}
        compiled = self.engine.compiled
        for run in moves:
            move = run.then or run.key
            event = compiled[move.process].on_enter(move.target)
            if event is None:
                continue
            key = (run.order.id, move.process, move.target, event)
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(run.order, key[1], key[2], event, [])
            group.items.extend(run.items)
        return list(groups.values())

    # -- one group -----------------------------------------------------------------------

    def context(self, group: Group) -> CommandContext:
        definition = self.engine.definitions[group.process]
        data = self.data if self._first_round and self.data else {}
        return CommandContext(
            self.session, definition, group.event, self.now, self.engine.services, data
        )

    def _fire(self, group: Group, *, record_stays: bool) -> list[Moves]:
        definition = self.engine.definitions[group.process]
        event_def = definition.events.get(group.event) if group.event is not None else None
        command_name = event_def.command if event_def is not None else None
        ctx = self.context(group)
        if command_name is None:
            return self.choose(group, list(group.items), None, ctx, record_stays)
        try:
            command = self.engine.registry.command(command_name)
        except LookupError as exc:
            self.fail(group, group.items, command_name, exc)
            return []
        if isinstance(command, ExternalCommand):
            return self._plan(group, command_name, command, ctx, record_stays)
        items = self._run_command(group, command_name, command, ctx)
        if not items:
            return []
        return self.choose(group, items, command_name, ctx, record_stays)

    def plan_external(self, group: Group, command_name: str) -> None:
        """Plan ``command_name`` (an external command) for ``group`` outside any transition:
        a booking a person asks for on an order (a goodwill credit), exactly once through an
        intent like every booking. ``group.event`` is ``None``; the first round's
        ``CommandContext.data`` (``self.data``) tells the command what to book."""
        command = self.engine.registry.external(command_name)
        self._first_round = True
        try:
            ctx = self.context(group)
            moves = self._plan(group, command_name, command, ctx, record_stays=False)
        finally:
            self._first_round = False
        self._rounds([], moves, record_stays=False)

    def _plan(
        self,
        group: Group,
        command_name: str,
        command: ExternalCommand[Any, Any],
        ctx: CommandContext,
        record_stays: bool,
    ) -> list[Moves]:
        """Let ``command`` plan its call and write the intent (the drive loop sends it after
        this transaction commits); a plan without a call goes on as answered."""
        if self._held(group, command_name):
            return []
        replan = self.replan
        key: PlanKey | None = None
        if replan is not None and not replan.savepoints:
            # Before the plan: one whose flush fails has the session roll back, expiring the
            # order (reading its ref then would raise instead of failing the plan).
            key = self._plan_key(group, command_name)
        if replan is not None and replan.known:
            key = key or self._plan_key(group, command_name)
            known = replan.known.get(key)
            if known is not None:
                self.stats.commands_run += 1
                self.fail(group, group.items, command_name, known)
                return []
        try:
            if replan is None or replan.savepoints:
                with self.session.begin_nested():
                    call = command.plan(ctx, group.order, group.items)
            else:
                call = command.plan(ctx, group.order, group.items)
        except Exception as exc:
            if database_lost(exc):
                raise
            if replan is not None and not replan.savepoints:
                # What the plan wrote is in the transaction: all of it goes back.
                assert key is not None
                failed = PlanFailed(key, exc)
                replan.failed = failed
                raise failed from exc
            self.stats.commands_run += 1
            self.fail(group, group.items, command_name, exc)
            return []
        if call is None:
            # Decided without a call (the command recorded why): go on as answered.
            self.stats.commands_run += 1
            return self.choose(group, list(group.items), command_name, ctx, record_stays)
        summary = dict(call.summary)
        if ctx.data:
            summary[EVENT_DATA_KEY] = dict(ctx.data)  # the move after the call records it
        stored = json.dumps(summary, default=str, sort_keys=True)
        row = {
            "order_id": group.order.id,
            "process": group.process,
            "state": group.state,
            "event": group.event,
            "command": command_name,
            "item_ids": json.dumps([i.id for i in group.items]),
            "summary": stored,
            "status": INTENT_PENDING,
            "worker": self.engine.claims.worker_id,
            "attempts": 0,
            "created_at": self.now,
            # Not before our lease would have run out: until then the call may still be in
            # flight, and asking too early could read "not booked" and send it twice.
            "reconcile_at": wall_now() + self.engine.claims.lease,
        }
        order_id = group.order.id
        # The call's lease goes with its intent where the INSERT can carry it (not for an
        # order the tick's lock leased ahead).
        lease = None if order_id in self.leased else (
            self.engine.claims.worker_id, wall_now() + self.engine.claims.lease
        )
        intent_id, leased = insert_intent(self.session, row, marking=group.items, lease=lease)
        if leased:
            self.leased_with_intent.add(order_id)
        self.open_intents[order_id] = True
        self.calls.append(
            Call(
                intent_id=intent_id,
                order_id=group.order.id,
                command=command_name,
                summary=call.summary,
                prepared=call,
                record_stays=record_stays,
                stored=stored,
                loaded=Loaded(group.order, tuple(group.items)),
            )
        )
        return []

    def _plan_key(self, group: Group, command_name: str) -> PlanKey:
        order = group.order
        return (order.order_ref, group.process, group.state, group.event, command_name,
                self.guard.fired(order.id, group.state, group.event), len(group.items))

    def _held(self, group: Group, command_name: str) -> bool:
        """Whether ``group``'s booking must wait for another booking of its order that is in
        doubt (its answer lost, not yet reconciled, or left to a person).

        An order's bookings happen one after another: a booking is planned from our ledger
        (what RatePAY holds before it), and reconciling a lost answer compares RatePAY's
        figures with that ledger. A second booking planned beside one in doubt would be
        planned on a ledger that misses the first, and the status API could then tell neither
        of them apart (two returns of one article show as one figure). So the group stays
        where it is, with its event due again once the other is settled; nothing is sent.

        An order this transaction already knows to have none (``open_intents``) is not asked
        about again: a statement per booking saved."""
        if self.open_intents.get(group.order.id) is False:
            return False
        row = self.session.execute(_OPEN_INTENT, {"order_id": group.order.id}).first()
        if row is None:
            return False
        blocking, status, reconcile_at = row
        if group.event is None:
            ref = group.order.order_ref
            raise BookingInDoubtError(
                f"order {ref} has a booking in doubt (intent {blocking}, {status}); settle it "
                f"first (`ratepay-oms intents list --order {ref}`)"
            )
        if status == INTENT_PENDING and reconcile_at is not None:
            wait = max(reconcile_at - wall_now(), timedelta(0)) + timedelta(seconds=1)
        else:
            wait = HOLD_RECHECK
        why = (
            f"held: {command_name} waits for intent {blocking} of this order ({status}: its "
            f"booking is in doubt); fired again once it is settled"
        )
        log.info("order %s: %s items [%s] %s", group.order.order_ref, group.event,
                 ", ".join(str(i.id) for i in group.items), why)
        for item in group.items:
            item.retry_event = group.event
            item.retry_at = self.now + wait
            item.last_error = why
        self.stats.retries_scheduled += len(group.items)
        self.stats.held.extend((i.id, why) for i in group.items)
        return True

    def choose(
        self,
        group: Group,
        items: list[OrderItem],
        command_name: str | None,
        ctx: CommandContext,
        record_stays: bool,
    ) -> list[Moves]:
        """Pick each item's transition (conditions first, the fallback last): the one place
        that chooses, through ``CompiledProcess.choose`` (which records each condition's
        answer on the subject). Items that stay get their retry cleared.

        Where the machine's answer needs no condition (``CompiledProcess.fixed``) it is the
        same for every item, so the whole group is one run; otherwise the items go one by one
        and consecutive items sent the same way form a run (in the items' order)."""
        compiled = self.engine.compiled[group.process]
        keys: dict[int, MoveKey] = {}

        def key_of(chosen: TransitionDef) -> MoveKey:
            key = keys.get(id(chosen))
            if key is None:
                key = keys[id(chosen)] = MoveKey(
                    group.process, group.state, chosen.target, group.event, command_name,
                    chosen.condition,
                )
            return key

        fixed = compiled.fixed(group.state, group.event)
        if fixed is not None:
            return [Moves(key_of(fixed), group.order, items)] if items else []
        moves: list[Moves] = []
        stayed: list[OrderItem] = []
        has_conditions = compiled.conditional(group.state, group.event)
        last: TransitionDef | None = None

        def place(item: OrderItem, chosen: TransitionDef | None) -> None:
            nonlocal last
            if chosen is None:
                stayed.append(item)
            elif chosen is last:
                moves[-1].items.append(item)
            else:
                moves.append(Moves(key_of(chosen), group.order, [item]))
                last = chosen

        # The whole group at once, a condition at a time (``CompiledProcess.choose_many``).
        # Conditions should only read; a savepoint still protects the transaction from one
        # that fails inside the database (PostgreSQL aborts the whole transaction then),
        # unless none of them reads it now (``Condition.reads_database``: answers the
        # command just recorded, as after a gateway call).
        guarded = has_conditions and compiled.reads_database(
            group.state, group.event, ctx, group.order
        )
        try:
            with self.session.begin_nested() if guarded else nullcontext():
                answers, asked = compiled.choose_many(
                    group.state, group.event, group.order, items, ctx
                )
        except Exception as exc:
            if database_lost(exc):
                raise
            remaining = list(items)  # item by item below, to find the one that fails
        else:
            remaining = []
            for condition in asked:
                self.writer.record_condition(
                    [items[index] for index in condition.at], group.process, group.state,
                    group.event, condition.condition, condition.verdicts,
                )
            for item, chosen in zip(items, answers, strict=True):
                place(item, chosen)
        while remaining:
            done = 0
            try:
                with self.session.begin_nested() if has_conditions else nullcontext():
                    for item in remaining:
                        subject = Subject(group.state, group.order, item, ctx)
                        chosen = compiled.choose(group.event, subject)
                        self.writer.record_conditions(
                            item, group.process, group.state, group.event, subject.checks
                        )
                        done += 1
                        place(item, chosen)
            except Exception as exc:
                if database_lost(exc):
                    raise
                failed = remaining[done]
                self.fail(group, [failed], command_name, exc, condition_failed=True)
                remaining = remaining[done + 1 :]
            else:
                remaining = []

        if stayed:
            self.writer.clear_retry(stayed)
            if command_name is not None:
                for item in stayed:
                    self.writer.log(
                        item,
                        process=group.process,
                        event=group.event,
                        source=group.state,
                        target=None,
                        command=command_name,
                    )
            if record_stays:
                self.stats.stayed.extend(i.id for i in stayed)
        return moves

    def _run_command(
        self,
        group: Group,
        command_name: str,
        command: ByOrderCommand | ByItemCommand,
        ctx: CommandContext,
    ) -> list[OrderItem]:
        """Run an in-transaction command; return the items it succeeded for."""
        if isinstance(command, ByOrderCommand):
            try:
                with self.session.begin_nested():
                    command.run(ctx, group.order, list(group.items))
            except Exception as exc:
                if database_lost(exc):
                    raise
                self.fail(group, group.items, command_name, exc)
                return []
            finally:
                self.stats.commands_run += 1
            return list(group.items)
        ok: list[OrderItem] = []
        for item in group.items:
            try:
                with self.session.begin_nested():
                    command.run_item(ctx, group.order, item)
            except Exception as exc:
                if database_lost(exc):
                    raise
                self.fail(group, [item], command_name, exc)
            else:
                ok.append(item)
            finally:
                self.stats.commands_run += 1
        return ok

    # -- settling a gateway call -------------------------------------------------------------

    def settle(
        self,
        intent_id: int,
        answer: Any,
        resolution: str,
        *,
        record_stays: bool = False,
        note: str | None = None,
        loaded: Loaded | None = None,
    ) -> bool:
        """Settle the intent (compare-and-set on its status, so it is applied at most once),
        apply ``answer`` (a ``Reconciled`` that is not booked: retry instead), choose, move,
        cascade. ``False``: someone else settled it first (nothing written).

        ``loaded``: the order and items as the planning transaction committed them (this
        worker's own, see ``Call.loaded``); they are taken into this session as they are
        instead of being read again. That is safe once the compare-and-set is won: until
        the intent is settled its items accept no event, forced move or migration (they
        wait on it), and the order's lease keeps every other writer off the order."""
        booked = not isinstance(answer, Reconciled) or answer.booked
        conn = self.session.connection()
        returning = conn.dialect.update_returning
        # PostgreSQL: the compare-and-set also tells whether the order has another open
        # intent (SQLite renders the columns of RETURNING unqualified, which a subquery on the
        # same table would read as its own).
        others = returning and conn.dialect.name == "postgresql"
        if others:
            statement = prebuilt("settle returning others", "", _settle_returning_others)
        elif returning:
            statement = prebuilt("settle returning", "", _settle_returning)
        else:
            statement = prebuilt("settle", "", _settle_statement)
        params = {"intent_id": intent_id, "resolution": resolution, "settled_at": self.now,
                  "note": note}
        rider = self.rider if others else None
        release = self.release_with_settle if others else None
        if rider is not None or release is not None:
            self.rider = self.release_with_settle = None
            won = self._carrying(conn, statement, params, rider, release)
        elif returning:
            won = conn.execute(statement, params)
        else:
            won = execute_rowless(conn, statement, params)
        # Plain columns, no ORM object: the intent is only read from here on. Where the
        # database can, the compare-and-set returns them (one statement fewer).
        if returning:
            intent = won.one_or_none()
            settled_here = intent is not None
        else:
            settled_here = won.rowcount == 1
        if not settled_here:
            log.warning("intent %s was settled by someone else; nothing applied", intent_id)
            return False
        if not returning:
            intent = conn.execute(prebuilt("settled intent", "", _settled_intent_statement),
                {"intent_id": intent_id},
            ).one()
        assert intent is not None
        if others:
            # The compare-and-set read along whether the order has another open intent.
            self.open_intents[intent.order_id] = bool(intent.others_open)
        summary = json.loads(intent.summary)
        if loaded is not None and _intact(loaded) and loaded.order.id == intent.order_id:
            order, items = self._take_up(loaded)
        else:
            order = self.session.get_one(Order, intent.order_id)
            items = blocked_items(self.session, intent_id)
        if not items:
            return True
        group = Group(order, intent.process, intent.state, intent.event, items)
        if not booked:
            mark_items(self.session, items, None)
            detail = answer.detail if isinstance(answer, Reconciled) else ""
            if resolution == NOT_SENT:
                self.stats.commands_run += 1
            self.fail(
                group,
                items,
                intent.command,
                f"not booked at the gateway ({resolution}): {detail}".rstrip(": "),
                retry_in=timedelta(0) if resolution != NOT_SENT else None,
            )
            self.finish()
            return True
        command = self.engine.registry.external(intent.command)
        ctx = self.context(group)
        # No savepoint: nothing here catches a failing ``apply``; it rolls the whole settling
        # transaction back (compare-and-set included), which a savepoint did not change.
        command.apply(ctx, order, items, summary, answer)
        self.stats.commands_run += 1
        moves = self.choose(group, list(items), intent.command, ctx, record_stays)
        # Items that move are unmarked by their move's UPDATE; the others here. (The moves hold
        # these very objects: told apart by identity, no ORM attribute read per item.)
        moving = {i for run in moves for i in run.items}
        mark_items(self.session, [i for i in items if i not in moving], None)
        if isinstance(summary.get(EVENT_DATA_KEY), dict):
            self.data = summary[EVENT_DATA_KEY]  # the moves of the event that carried it
        self._rounds([], moves, record_stays=False)
        return True

    def _carrying(
        self,
        conn: Connection,
        statement: Any,
        params: dict[str, Any],
        rider: Rider | None,
        release: int | None,
    ) -> Any:
        """``statement`` (the compare-and-set) carrying ``rider``'s INSERT and the drop of
        our lease on ``release`` as CTEs: one statement for all. PostgreSQL runs both to
        completion whether or not the compare-and-set matches, as when each went on its own
        (the lease was dropped after a lost compare-and-set too). A refusal of the rows
        (``HeldRowsRefused``) rolls the settle back, to run again without them."""
        key = (statement, rider.statement if rider is not None else None, release is not None)
        carrying = _CARRYING.get(key)
        if carrying is None:
            ctes = [] if rider is None else [rider.statement.columns().cte("held_rows")]
            if release is not None:
                ctes.append(riding_release())
            carrying = _CARRYING[key] = statement.add_cte(*ctes)
        values = params if rider is None else {**params, **rider.params}
        if release is not None:
            values = {**values, "release_order": release,
                      "release_worker": self.engine.claims.worker_id}
        try:
            won = conn.execute(carrying, values)
        except DBAPIError as exc:
            if rider is None or database_lost(exc):
                raise
            raise HeldRowsRefused(describe_error(exc)) from exc
        if release is not None:
            self.released.add(release)
        return won

    def _take_up(self, loaded: Loaded) -> tuple[Order, list[OrderItem]]:
        """``loaded``'s objects in this session, without a statement: the ones
        ``session.add(order)`` would attach (the order and the items of its loaded
        collection) and the intent's items.

        Attached one by one, as ``add`` attaches each object its cascade reaches
        (``Session._update_impl``), without the cascade walk itself: that visits every mapped
        attribute of every object to find the two relationships (28 attributes for an order
        of one unit; three quarters of the calls of taking up an order of two units, and
        more than reading a 10,000-unit order anew)."""
        session = self.session
        order = loaded.order
        objects: list[object] = [order]
        collection = instance_state(order).dict.get("items")
        if collection:
            objects.extend(collection)
        objects.extend(loaded.items)
        mine = session.hash_key
        for obj in objects:
            state = instance_state(obj)
            if state.session_id == mine:
                continue  # attached already (an item of the collection and of the intent)
            if state.key is None:
                session.add(obj)  # not persisted (never expected): as add made of it
            else:
                session._update_impl(state)  # raises as add did for another session's
        return order, list(loaded.items)

    def leave_open(self, intent_id: int, message: str) -> None:
        """The call may have been booked (no usable answer): the intent stays open for
        reconciliation (due at once), its items blocked and the error logged, no retry."""
        intent = self.session.get_one(Intent, intent_id)
        intent.last_error = message
        intent.reconcile_at = wall_now()
        order = self.session.get_one(Order, intent.order_id)
        items = blocked_items(self.session, intent_id)
        group = Group(order, intent.process, intent.state, intent.event, items)
        text = (
            f"{message} (may have been booked: intent {intent_id} is reconciled by the "
            "next tick, not re-sent)"
        )
        for item in items:
            item.last_error = text
        self.stats.commands_run += 1
        self._record_error(group, items, intent.command, text)
        self.finish()

    # -- failures --------------------------------------------------------------------------

    def _record_error(
        self, group: Group, items: Sequence[OrderItem], command_name: str | None, message: str
    ) -> None:
        """Transition-log rows and the run's error figures for a failure of ``items``."""
        for item in items:
            self.writer.log(
                item,
                process=group.process,
                event=group.event,
                source=group.state,
                target=None,
                command=command_name,
                error=message,
            )
        ids = ", ".join(str(i.id) for i in items)
        text = (
            f"order {group.order.order_ref} items [{ids}] {group.event or '(event-less)'} "
            f"in {group.state}: {message}"
        )
        self.stats.error(text)
        self.stats.failed.extend((i.id, text) for i in items)

    def fail(
        self,
        group: Group,
        items: Sequence[OrderItem],
        command_name: str | None,
        exc: BaseException | str,
        *,
        condition_failed: bool = False,
        retry_in: timedelta | None = None,
    ) -> None:
        """Leave ``items`` in place, log the error and schedule a retry with backoff
        (``retry_in`` overrides the backoff: a call known not to have been booked goes again
        at once)."""
        message = exc if isinstance(exc, str) else describe_error(exc)
        what = "condition" if condition_failed else (command_name or "event")
        log.warning(
            "order %s: %s failed for %d item(s) in %s on %s: %s",
            group.order.order_ref,
            what,
            len(items),
            group.state,
            group.event or "(event-less)",
            message,
        )
        for item in items:
            attempts = (item.attempts or 0) + 1
            item.retry_event = group.event
            item.retry_at = self.now + (retry_delay(attempts) if retry_in is None else retry_in)
            item.attempts = attempts
            item.last_error = message
        self.stats.retries_scheduled += len(items)
        self._record_error(group, items, command_name, message)

    def _loop_guard(self, group: Group) -> None:
        self.fail(
            group,
            group.items,
            None,
            f"loop guard: {group.event or '(event-less)'} fired more than {MAX_EVENT_REPEATS} "
            f"times from {group.state} in one run; check the process for an on-enter cycle",
        )


def _intact(loaded: Loaded) -> bool:
    """Whether ``loaded`` is still as its planning transaction committed it. Not when an
    earlier attempt of this settle took it up and was rolled back (``Drive.transact`` re-runs
    a transaction whose plan failed): the rollback expired the objects, and reading them one
    by one would cost a statement each, so the settle reads them again as a whole."""
    state = instance_state(loaded.order)
    return not (state.expired or state.expired_attributes)


def mark_items(session: Session, items: Sequence[OrderItem], intent_id: int | None) -> None:
    """Mark ``items`` as waiting on ``intent_id`` (``None``: no longer waiting). A Core
    UPDATE on the session's connection, after a flush so it sees what the session holds."""
    if not items:
        return
    session.flush()
    conn = session.connection()
    style = ids_style(session)
    statement = prebuilt("mark", style, _mark_statement)
    for part in chunked([i.id for i in items]):
        conn.execute(statement, {"ids": ids_value(part, style), "intent": intent_id})
    _marked(items, intent_id)


def _marked(items: Sequence[OrderItem], intent_id: int | None) -> None:
    """What the database now holds as the loaded ``intent_id`` of ``items``."""
    for item in items:
        # Straight into the loaded state when nothing of the item is pending or expired (what
        # set_committed_value does, minus its machinery: once per unit of a big order).
        state = instance_state(item)
        if state.committed_state or state.expired_attributes:
            set_committed_value(item, "intent_id", intent_id)
        else:
            state.dict["intent_id"] = intent_id


_INTENTS = cast(Table, Intent.__table__)
_INSERT_INTENT = insert(_INTENTS).returning(_INTENTS.c.id)

_CARRYING: dict[tuple[Any, TextClause | None, bool], Any] = {}
"""The compare-and-set carrying held rows and a lease's drop, per (compare-and-set, rows'
INSERT, whether a lease is dropped): built once per shape of rows (a handful: one INSERT per
number of rows)."""


def insert_intent(
    session: Session,
    row: dict[str, Any],
    *,
    marking: Sequence[OrderItem] = (),
    lease: tuple[str, datetime] | None = None,
) -> tuple[int, bool]:
    """Write an intent row and mark ``marking`` as waiting on it; the intent's id and
    whether ``lease`` (worker, until) went with it on its order. One Core ``INSERT …
    RETURNING`` where the database has it (the unit of work for one new object costs more
    CPU than the row), else the ORM. On PostgreSQL the first chunk of items is marked by the
    same statement (a data-modifying CTE), and the lease written by one more: one round trip
    for all three."""
    session.flush()  # what the session holds first (the intent refers to the order)
    conn = session.connection()
    if conn.dialect.name == "postgresql" and marking:
        ids = [i.id for i in marking]
        first, rest = ids[:CHUNK], marking[CHUNK:]
        values = {f"v_{k}": v for k, v in row.items()}
        values["ids"] = ids_value(first, "array")
        statement = _INSERT_INTENT_MARKING
        if lease is not None:
            statement = _INSERT_INTENT_MARKING_LEASING
            values.update(lease_order=row["order_id"], lease_worker=lease[0],
                          lease_until=lease[1])
        intent_id = int(conn.execute(statement, values).scalar_one())
        _marked(marking[:CHUNK], intent_id)
        mark_items(session, rest, intent_id)
        return intent_id, lease is not None
    if conn.dialect.insert_returning:
        intent_id = int(conn.execute(_INSERT_INTENT, row).scalar_one())
    else:
        intent = Intent(**row)
        session.add(intent)
        session.flush()
        intent_id = intent.id
    mark_items(session, marking, intent_id)
    return intent_id, False


def _insert_intent_marking() -> Any:
    """``WITH intent AS (INSERT … RETURNING id), marked AS (UPDATE oms_order_item SET
    intent_id = (SELECT id FROM intent) WHERE id = ANY(:ids)) SELECT id FROM intent``
    (PostgreSQL: both CTEs run to completion on one snapshot; the UPDATE reads the new id
    through the first one's RETURNING, and the items' foreign key is checked at the end of
    the statement, when the intent row exists)."""
    columns = ("order_id", "process", "state", "event", "command", "item_ids", "summary",
               "status", "worker", "attempts", "created_at", "reconcile_at")
    intent = (
        insert(_INTENTS)
        # Parameters named after no column: an UPDATE in the statement would take a
        # parameter named like one of its table's columns as a value to SET.
        .values({c: bindparam(f"v_{c}", type_=_INTENTS.c[c].type) for c in columns})
        .returning(_INTENTS.c.id)
        .cte("new_intent")
    )
    marked = (
        update(ITEMS)
        .where(ids_clause(OrderItem.id, "array"))
        .values(intent_id=select(intent.c.id).scalar_subquery())
        .cte("marked")
    )
    return select(intent.c.id).add_cte(marked)


_INSERT_INTENT_MARKING = _insert_intent_marking()
_INSERT_INTENT_MARKING_LEASING = _INSERT_INTENT_MARKING.add_cte(riding_lease())


def _mark_statement(style: str) -> Any:
    return (
        update(ITEMS)
        .where(ids_clause(OrderItem.id, style))
        .values(intent_id=bindparam("intent", type_=ITEMS.c.intent_id.type))
    )


def _settle_statement(style: str) -> Any:
    """The compare-and-set of :meth:`Runner.settle` (one statement object for every call)."""
    intents = cast(Table, Intent.__table__)
    return (
        update(intents)
        .where(
            intents.c.id == bindparam("intent_id", type_=intents.c.id.type),
            intent_open(intents.c.status),
        )
        .values(
            status=INTENT_SETTLED,
            resolution=bindparam("resolution", type_=intents.c.resolution.type),
            settled_at=bindparam("settled_at", type_=intents.c.settled_at.type),
            note=bindparam("note", type_=intents.c.note.type),
        )
    )


def _open_intent_statement() -> Any:
    """The oldest open intent of an order (``:order_id``): what a new booking waits for."""
    intents = cast(Table, Intent.__table__)
    return (
        select(intents.c.id, intents.c.status, intents.c.reconcile_at)
        .where(
            intents.c.order_id == bindparam("order_id", type_=intents.c.order_id.type),
            intent_open(intents.c.status),
        )
        .order_by(intents.c.id)
        .limit(1)
    )


_OPEN_INTENT = _open_intent_statement()


def _settled_columns() -> tuple[Any, ...]:
    intents = cast(Table, Intent.__table__)
    return (
        intents.c.order_id,
        intents.c.process,
        intents.c.state,
        intents.c.event,
        intents.c.command,
        intents.c.summary,
    )


def _settle_returning(style: str) -> Any:
    return _settle_statement(style).returning(*_settled_columns())


def _settle_returning_others(style: str) -> Any:
    """PostgreSQL: the compare-and-set returning the intent's columns and whether its order
    has another open intent (``Runner.open_intents``; the subquery reads the statement's
    snapshot, in which this intent is still open, so it is left out by its id)."""
    intents = cast(Table, Intent.__table__)
    other = intents.alias("other_intent")
    others_open = (
        exists()
        .where(
            other.c.order_id == intents.c.order_id,
            intent_open(other.c.status),
            other.c.id != intents.c.id,
        )
        .correlate(intents)
        .label("others_open")
    )
    return _settle_statement(style).returning(*_settled_columns(), others_open)


def _settled_intent_statement(style: str) -> Any:
    intents = cast(Table, Intent.__table__)
    return select(*_settled_columns()).where(
        intents.c.id == bindparam("intent_id", type_=intents.c.id.type)
    )


def blocked_items(session: Session, intent_id: int) -> list[OrderItem]:
    return list(
        session.scalars(
            select(OrderItem).where(OrderItem.intent_id == intent_id).order_by(OrderItem.id)
        )
    )
