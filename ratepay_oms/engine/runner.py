"""Firing events for groups of items: command, conditions, state change, on-enter cascade.

The order of work is Spryker's: items are grouped by (order, source state, event); a by-order
command runs once per group (a by-item command once per item); then each item's transition is
chosen by the compiled machine (conditional transitions first, the unconditional fallback
last); then the moves are written set-based; then the on-enter events of the states the items
landed in fire for them, grouped again, until the items rest.

A command with an outside effect (``ExternalCommand``, a RatePAY booking) is not run here: its
group is handed back in ``deferred`` and the caller runs it after committing, through
``ratepay_oms.engine.intents`` (intent, call, settle), which continues the cascade with
:meth:`Runner.resume`.

Everything else happens inside the caller's transaction. Each command (and each item's condition
checks) runs inside a SAVEPOINT, so a command that raises is rolled back alone: its items stay
where they were with an error row in the transition log and a retry scheduled with backoff,
while the other groups of the same batch still commit. What a command wrote through
``ctx.session`` commits together with the state change it led to.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError, PendingRollbackError
from sqlalchemy.orm import Session

from ratepay_oms.engine.clock import retry_delay
from ratepay_oms.engine.compiler import CompiledProcess, Subject
from ratepay_oms.engine.persist import Move, Origin, StateWriter
from ratepay_oms.engine.plugins import CommandContext, PluginRegistry, is_external
from ratepay_oms.persistence.models import Order, OrderItem
from ratepay_oms.process.model import ProcessDefinition

log = logging.getLogger(__name__)

MAX_EVENT_REPEATS = 10
"""How often one (order, state, event) may fire in one cascade before the loop guard stops it."""

MAX_ERROR_LENGTH = 2000


@dataclass
class Group:
    """Items of one order that take the same event from the same state."""

    order: Order
    process: str
    state: str
    event: str | None
    items: list[OrderItem]


@dataclass(frozen=True)
class Deferred:
    """A group whose external command runs after the caller's transaction committed."""

    order_id: int
    process: str
    state: str
    event: str | None
    command: str
    item_ids: tuple[int, ...]
    record_stays: bool = False


@dataclass
class RunStats:
    """What one or more runs did; the engine turns it into a Trigger- or TickResult."""

    items_moved: int = 0
    commands_run: int = 0
    errors: int = 0
    retries_scheduled: int = 0
    moves: list[tuple[int, str, str]] = field(default_factory=list)
    stayed: list[int] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)


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
    so the whole batch rolls back and is counted as a database failure."""
    return isinstance(exc, OperationalError | InterfaceError | PendingRollbackError) or bool(
        getattr(exc, "connection_invalidated", False)
    )


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:MAX_ERROR_LENGTH]


class Runner:
    """One unit of work over an open session; call :meth:`run` with the starting groups."""

    def __init__(
        self,
        session: Session,
        compiled: Mapping[str, CompiledProcess],
        registry: PluginRegistry,
        services: Mapping[str, Any],
        now: datetime,
        origin: Origin,
        stats: RunStats | None = None,
    ) -> None:
        self.session = session
        self.compiled = compiled
        self.registry = registry
        self.services = dict(services)
        self.now = now
        self.stats = stats if stats is not None else RunStats()
        self.writer = StateWriter(session, now, origin)
        self.deferred: list[Deferred] = []
        self._definitions: dict[str, ProcessDefinition] = {
            name: c.definition for name, c in compiled.items()
        }

    # -- the cascade ---------------------------------------------------------------------

    def run(self, groups: Sequence[Group], *, record_stays: bool = False) -> None:
        """Fire ``groups``, then the on-enter events of wherever their items land.

        ``record_stays``: remember items of the *first* round that stayed (manual triggers
        report them); cascade rounds only ever start from items that moved.
        """
        self._rounds(list(groups), [], record_stays=record_stays)

    def resume(
        self,
        group: Group,
        command_name: str,
        apply: Callable[[CommandContext], None] | None,
        *,
        record_stays: bool = False,
    ) -> None:
        """Go on with ``group`` after its external command: ``apply`` records the answer, then
        conditions choose, the moves are written and the on-enter cascade runs."""
        ctx = self.context(group)
        if apply is not None:
            with self.session.begin_nested():
                apply(ctx)
            self.stats.commands_run += 1
        moves = self._choose(group, list(group.items), command_name, ctx, record_stays)
        self._rounds([], moves, record_stays=False)

    def finish(self) -> None:
        """Write what is buffered (transition-log rows) without firing anything."""
        self.writer.flush_log()
        self.session.flush()

    def _rounds(self, pending: list[Group], carried: list[Move], *, record_stays: bool) -> None:
        repeats: Counter[tuple[int, str, str | None]] = Counter()
        first = True
        while pending or carried:
            moves: list[Move] = carried
            carried = []
            for group in pending:
                key = (group.order.id, group.state, group.event)
                repeats[key] += 1
                if repeats[key] > MAX_EVENT_REPEATS:
                    self._loop_guard(group)
                    continue
                moves.extend(self._fire(group, record_stays=record_stays and first))
            self.writer.write_moves(moves, self._definitions)
            self.stats.items_moved += len(moves)
            self.stats.moves.extend((m.item.id, m.source, m.target) for m in moves)
            pending = self._on_enter_groups(moves)
            first = False
        self.writer.flush_log()
        self.session.flush()

    def _on_enter_groups(self, moves: Sequence[Move]) -> list[Group]:
        landed: list[tuple[OrderItem, str | None]] = []
        orders: dict[int, Order] = {}
        for move in moves:
            event = self._definitions[move.process].on_enter_event(move.target)
            if event is not None:
                landed.append((move.item, event.name))
                orders[move.item.order_id] = move.item.order
        return group_items(landed, orders)

    # -- one group -----------------------------------------------------------------------

    def context(self, group: Group) -> CommandContext:
        definition = self.compiled[group.process].definition
        return CommandContext(self.session, definition, group.event, self.now, self.services)

    def _fire(self, group: Group, *, record_stays: bool) -> list[Move]:
        definition = self.compiled[group.process].definition
        event_def = definition.events.get(group.event) if group.event is not None else None
        command_name = event_def.command if event_def is not None else None
        ctx = self.context(group)
        if command_name is not None and self._defer(group, command_name, record_stays):
            return []
        items = self._run_command(group, command_name, ctx)
        if not items:
            return []
        return self._choose(group, items, command_name, ctx, record_stays)

    def _defer(self, group: Group, command_name: str, record_stays: bool) -> bool:
        if not self.registry.has_command(command_name):
            return False
        if not is_external(self.registry.command(command_name)):
            return False
        self.deferred.append(
            Deferred(
                order_id=group.order.id,
                process=group.process,
                state=group.state,
                event=group.event,
                command=command_name,
                item_ids=tuple(i.id for i in group.items),
                record_stays=record_stays,
            )
        )
        return True

    def _choose(
        self,
        group: Group,
        items: list[OrderItem],
        command_name: str | None,
        ctx: CommandContext,
        record_stays: bool,
    ) -> list[Move]:
        """Pick each item's transition (conditions first, the fallback last)."""
        compiled = self.compiled[group.process]
        candidates = compiled.definition.transitions_from(group.state, group.event)
        moves: list[Move] = []
        stayed: list[OrderItem] = []
        has_conditions = any(t.condition for t in candidates)
        remaining = list(items)
        while remaining:
            # Conditions should only read; a savepoint still protects the transaction from one
            # that fails inside the database (PostgreSQL aborts the whole transaction then).
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
                        if chosen is None:
                            stayed.append(item)
                        else:
                            moves.append(
                                Move(
                                    item=item,
                                    process=group.process,
                                    source=group.state,
                                    target=chosen.target,
                                    event=group.event,
                                    command=command_name,
                                    condition=chosen.condition,
                                )
                            )
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
        self, group: Group, command_name: str | None, ctx: CommandContext
    ) -> list[OrderItem]:
        """Run the event's command; return the items it succeeded for."""
        if command_name is None:
            return list(group.items)
        try:
            command = self.registry.command(command_name)
        except LookupError as exc:
            self.fail(group, group.items, command_name, exc)
            return []
        if getattr(command, "by_order", False):
            try:
                with self.session.begin_nested():
                    command.run(ctx, group.order, list(group.items))  # type: ignore[union-attr]
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
                    command.run_item(ctx, group.order, item)  # type: ignore[union-attr]
            except Exception as exc:
                if database_lost(exc):
                    raise
                self.fail(group, [item], command_name, exc)
            else:
                ok.append(item)
            finally:
                self.stats.commands_run += 1
        return ok

    # -- failures --------------------------------------------------------------------------

    def note_error(
        self, group: Group, items: Sequence[OrderItem], command_name: str, message: str
    ) -> None:
        """Log an error for ``items`` without scheduling a retry (an open intent blocks them:
        it is reconciled, not retried)."""
        for item in items:
            item.last_error = message
        self._record_error(group, items, command_name, message)

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
        self.stats.errors += 1
        ids = ", ".join(str(i.id) for i in items)
        self.stats.error_messages.append(
            f"order {group.order.order_ref} items [{ids}] {group.event or '(event-less)'} "
            f"in {group.state}: {message}"
        )

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
            f"times from {group.state} in one cascade; check the process for an on-enter cycle",
        )
