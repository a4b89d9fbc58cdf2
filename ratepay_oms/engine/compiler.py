"""A process definition compiled into one shared ``transitions.Machine``.

One machine per process version, built once and never given a model: ``transitions`` keeps
every model in a list and binds methods onto it, which its maintainers advise against for
thousands of rows. Instead the engine wraps the row being moved in a tiny :class:`Subject`
and walks the machine's transitions for the event from the subject's state in the order the
machine tries them (conditional first, the unconditional fallback last, as
``ProcessDefinition.transitions_from`` orders them): the first whose condition holds wins.
That is ``machine.events[event].trigger(subject)`` without the per-call ``EventData``,
callbacks and logging, which cost more CPU than the decision. The database write is the
engine's job.

Commands are deliberately not machine callbacks: a transition's ``prepare`` runs once per
candidate transition, and a command must run once per event.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transitions import Machine

from ratepay_oms.engine.plugins import CommandContext, PluginRegistry
from ratepay_oms.engine.verdict import Verdict, verdict_of
from ratepay_oms.process.model import ProcessDefinition, TransitionDef

if TYPE_CHECKING:
    from ratepay_oms.persistence.models import Order, OrderItem

log = logging.getLogger(__name__)

TICK_TRIGGER = "__oms_eventless__"
"""The machine's trigger for event-less transitions (polled by the tick)."""

STATE_ATTRIBUTE = "oms_state"
"""Attribute the machine reads and writes on a subject (not ``state``, which an event of a
process could be called)."""


@dataclass(eq=False)
class Subject:
    """What the shared machine moves: one item's state plus what its conditions need."""

    oms_state: str
    order: Order
    item: OrderItem
    ctx: CommandContext
    chosen: TransitionDef | None = field(default=None)
    checks: list[tuple[str, Verdict]] = field(default_factory=list)
    """Every condition asked for this subject and its answer, in order (recorded for
    ``explain``)."""


@dataclass(frozen=True)
class _ConditionCheck:
    """A condition plugin as a ``transitions`` condition (``send_event=True``)."""

    registry: PluginRegistry
    name: str

    def __call__(self, event_data: Any) -> bool:
        return self.ask(event_data.model)

    def ask_many(
        self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]
    ) -> list[Verdict]:
        """The condition's answers for ``items`` at once (``Condition.check_many``)."""
        answers = self.registry.condition(self.name).check_many(ctx, order, items)
        if len(answers) != len(items):
            raise ValueError(
                f"condition {self.name}: {len(answers)} answers for {len(items)} items"
            )
        # Verdicts as they are (what the RatePAY conditions return), the rest through
        # verdict_of: a call per item fewer.
        return [a if type(a) is Verdict else verdict_of(a) for a in answers]

    def reads_database(self, ctx: CommandContext, order: Order) -> bool:
        """``Condition.reads_database``; an unknown condition (or one whose answer raises)
        counts as reading: asking it then fails inside the savepoint, as always."""
        try:
            return self.registry.condition(self.name).reads_database(ctx, order)
        except Exception:
            return True

    def ask(self, subject: Subject) -> bool:
        condition = self.registry.condition(self.name)
        verdict = verdict_of(condition.check(subject.ctx, subject.order, subject.item))
        subject.checks.append((self.name, verdict))
        return verdict.holds


@dataclass(frozen=True)
class _RecordChoice:
    """``after`` callback: remember which transition won (its condition goes into the log)."""

    transition: TransitionDef

    def __call__(self, event_data: Any) -> None:
        event_data.model.chosen = self.transition


class CompiledProcess:
    """A definition plus its machine; :meth:`choose` evaluates one item's transition."""

    def __init__(self, definition: ProcessDefinition, registry: PluginRegistry) -> None:
        self.definition = definition
        states = list(definition.states)
        for t in definition.transitions:
            for name in (t.source, t.target):
                if name not in states:
                    states.append(name)
        self.machine = Machine(
            model=None,
            states=states,
            initial=definition.initial,
            auto_transitions=False,
            send_event=True,
            ignore_invalid_triggers=True,
            model_attribute=STATE_ATTRIBUTE,
            name=f"{definition.name}: ",
        )
        events: list[str | None] = [*definition.events, None]
        for event in events:
            trigger = event if event is not None else TICK_TRIGGER
            for state in states:
                for t in definition.transitions_from(state, event):
                    self.machine.add_transition(
                        trigger,
                        t.source,
                        t.target,
                        conditions=[_ConditionCheck(registry, t.condition)]
                        if t.condition
                        else None,
                        after=[_RecordChoice(t)],
                    )
        # The machine's transitions per (state, event), in the order it tries them, with their
        # condition checks: ``choose`` walks these itself. ``trigger`` would do the same walk
        # but builds an ``EventData``, partials and log records per item on the way, which
        # cost more CPU than the conditions themselves (a profile of a worker: ~6% of it).
        self._walk: dict[tuple[str, str | None], tuple[tuple[TransitionDef, _ConditionCheck
                                                             | None], ...]] = {}
        for event in events:
            machine_event = self.machine.events.get(event if event is not None else TICK_TRIGGER)
            if machine_event is None:
                continue
            for state, found in machine_event.transitions.items():
                steps = []
                for transition in found:
                    record = next(c for c in transition.after if isinstance(c, _RecordChoice))
                    checks = [c.func for c in transition.conditions]
                    check = checks[0] if checks else None
                    assert check is None or isinstance(check, _ConditionCheck)
                    steps.append((record.transition, check))
                self._walk[(state, event)] = tuple(steps)
        # Per (state, event): whether a condition decides (the runner puts a savepoint around
        # asking); per state: the on-enter event fired for items that land there. Asked for
        # every group and every move, answered here once.
        self._conditional: dict[tuple[str, str | None], bool] = {
            key: any(check is not None for _, check in steps) for key, steps in self._walk.items()
        }
        self._on_enter: dict[str, str | None] = {}
        for state in states:
            on_enter = definition.on_enter_event(state)
            self._on_enter[state] = on_enter.name if on_enter is not None else None
        # Where the first candidate has no condition, the machine's answer is fixed (conditional
        # transitions come first, so there are none): skip the machine for those, which is
        # most of a bulk tick.
        self._fixed: dict[tuple[str, str | None], TransitionDef] = {}
        for event in events:
            for state in states:
                candidates = definition.transitions_from(state, event)
                if candidates and candidates[0].condition is None:
                    self._fixed[(state, event)] = candidates[0]
        # Of those, the moves that need nothing but the database: no command, no condition,
        # and no on-enter event where they land (so no cascade). The tick writes them
        # set-based without loading ORM objects or running the machine.
        self._plain: dict[tuple[str, str | None], TransitionDef] = {}
        for (state, event), t in self._fixed.items():
            event_def = definition.events.get(event) if event is not None else None
            if event is not None and event_def is None:
                continue
            command = event_def.command if event_def is not None else None
            if command is None and definition.on_enter_event(t.target) is None:
                self._plain[(state, event)] = t
        # States an item only passes through: their on-enter event has no command and leads
        # on without a condition, and entering them arms no timeout and notifies nobody. The
        # runner writes a move into one and the move out as one (``Runner._passed_on``).
        self._passes_on: dict[str, tuple[str, TransitionDef]] = {}
        for state in states:
            event = self._on_enter.get(state)
            event_def = definition.events.get(event) if event is not None else None
            onward = self._fixed.get((state, event))
            if (
                event is None or event_def is None or event_def.command is not None
                or onward is None or onward.target == state
                or definition.timeout_events(state) or definition.notifies(state)
            ):
                continue
            self._passes_on[state] = (event, onward)
        self._calls_out = frozenset(
            name
            for name, e in definition.events.items()
            if e.command is not None and registry.is_external(e.command)
        )
        self._may_call: dict[tuple[str, str | None], bool] = {}
        log.debug("compiled process %s (%d states)", definition.name, len(states))

    def calls_out(self, state: str, event: str | None) -> bool:
        """Whether firing ``event`` from ``state`` may lead to a gateway call in the same
        cascade: its command is an external one, or a state it can land in has an on-enter
        event that may (the tick plans no more such orders than it has call slots)."""
        key = (state, event)
        found = self._may_call.get(key)
        if found is None:
            found = self._may_call[key] = self._reaches_call(state, event, set())
        return found

    def _reaches_call(
        self, state: str, event: str | None, seen: set[tuple[str, str | None]]
    ) -> bool:
        if (state, event) in seen:
            return False
        seen.add((state, event))
        if event in self._calls_out:
            return True
        for t in self.definition.transitions_from(state, event):
            on_enter = self.definition.on_enter_event(t.target)
            if on_enter is not None and self._reaches_call(t.target, on_enter.name, seen):
                return True
        return False

    @property
    def name(self) -> str:
        return self.definition.name

    def plain_move(self, state: str, event: str | None) -> TransitionDef | None:
        """The transition ``event`` takes from ``state`` if that needs nothing but the
        database (see ``__init__``), else ``None`` (the runner has to fire it)."""
        return self._plain.get((state, event))

    def conditional(self, state: str, event: str | None) -> bool:
        """Whether a condition takes part in choosing ``event``'s transition from ``state``
        (``any(t.condition for t in definition.transitions_from(state, event))``)."""
        return self._conditional.get((state, event), False)

    def reads_database(
        self, state: str, event: str | None, ctx: CommandContext, order: Order
    ) -> bool:
        """Whether any condition :meth:`choose_many` may ask for ``event`` from ``state``
        may run SQL for ``order`` now (``Condition.reads_database``)."""
        for _, check in self._walk.get((state, event), ()):
            if check is not None and check.reads_database(ctx, order):
                return True
        return False

    def on_enter(self, state: str) -> str | None:
        """The name of the on-enter event of ``state`` (``definition.on_enter_event``)."""
        try:
            return self._on_enter[state]
        except KeyError:  # not a state of the process: as the definition answers
            found = self.definition.on_enter_event(state)
            return found.name if found is not None else None

    def passes_on(self, state: str) -> tuple[str, TransitionDef] | None:
        """Where an item that enters ``state`` goes on at once, whatever the item: the
        on-enter event and its transition; ``None`` unless ``state`` is only passed through
        (no command, no condition, no timeout, no notification)."""
        return self._passes_on.get(state)

    def fixed(self, state: str, event: str | None) -> TransitionDef | None:
        """The transition ``event`` takes from ``state`` whatever the item (no condition
        decides it), or ``None`` when conditions decide or nothing leads on: the runner then
        chooses per item (:meth:`choose`)."""
        return self._fixed.get((state, event))

    def choose_many(
        self,
        state: str,
        event: str | None,
        order: Order,
        items: Sequence[OrderItem],
        ctx: CommandContext,
    ) -> tuple[list[TransitionDef | None], list[Asked]]:
        """What :meth:`choose` answers for each of ``items`` (one group: same state, event
        and order), a condition at a time: each transition's condition is asked for all
        items no earlier one took, at once (``Condition.check_many``); the fallback takes
        the rest. Also returns the conditions asked, in the order asked (so each item's
        answers are in the order ``choose`` would have asked them).

        A condition that raises propagates; the caller then asks item by item."""
        chosen: list[TransitionDef | None] = [None] * len(items)
        asked: list[Asked] = []
        pending = list(range(len(items)))
        for transition, check in self._walk.get((state, event), ()):
            if not pending:
                break
            if check is None:
                for index in pending:
                    chosen[index] = transition
                break
            verdicts = check.ask_many(ctx, order, [items[index] for index in pending])
            asked.append(Asked(check.name, pending, verdicts))
            left = []
            for index, verdict in zip(pending, verdicts, strict=True):
                if verdict.holds:
                    chosen[index] = transition
                else:
                    left.append(index)
            pending = left
        return chosen, asked

    def choose(self, event: str | None, subject: Subject) -> TransitionDef | None:
        """The transition ``event`` takes for ``subject`` (``None``: it stays).

        A condition that raises propagates: the caller treats it like a failed command.
        """
        fixed = self._fixed.get((subject.oms_state, event))
        if fixed is not None:
            return fixed
        subject.chosen = None
        for transition, check in self._walk.get((subject.oms_state, event), ()):
            if check is None or check.ask(subject):
                subject.chosen = transition
                return transition
        return None


@dataclass(frozen=True)
class Asked:
    """One condition asked for some of a group's items (``at``: their positions in the
    group), with its answers in the same order."""

    condition: str
    at: list[int]
    verdicts: list[Verdict]


def compile_processes(
    definitions: dict[str, ProcessDefinition], registry: PluginRegistry
) -> dict[str, CompiledProcess]:
    """Compile every definition once (the engine keeps the result for its lifetime)."""
    return {name: CompiledProcess(d, registry) for name, d in definitions.items()}
