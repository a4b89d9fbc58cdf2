"""Immutable process definitions: what a YAML process file means once it is loaded and checked.

The loader (``ratepay_oms.process.loader``) builds these from YAML; the engine compiles them
into ``transitions`` machines; the console draws them. Nothing here knows about the database
or RatePAY, so a definition can be checked and drawn without either.

Vocabulary follows Spryker's OMS so a Spryker shop recognises its processes: a process has
states, transitions (source, target, optional event, optional condition, ``happy`` flag) and
events (``manual``, ``on_enter``, ``timeout``, ``command``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta


@dataclass(frozen=True)
class SourceLocation:
    """Where a definition element was written, for error messages (``file:line``)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class SlaDef:
    """How long an item may sit in a state: past ``warn`` it is reported, past ``breach`` it
    is a breach (``ratepay-oms alerts`` exits non-zero). Either may be absent, not both."""

    warn: timedelta | None = None
    breach: timedelta | None = None
    location: SourceLocation | None = None

    def level(self, waited: timedelta) -> str | None:
        """``"breach"``, ``"warn"`` or ``None`` for an item that has waited ``waited``."""
        if self.breach is not None and waited >= self.breach:
            return "breach"
        if self.warn is not None and waited >= self.warn:
            return "warn"
        return None


@dataclass(frozen=True)
class StateDef:
    name: str
    display: str | None = None
    flags: frozenset[str] = frozenset()
    reserved: bool = False
    location: SourceLocation | None = None
    sla: SlaDef | None = None
    notify: bool = False
    """Entering this state writes a state-change notification (the outbox)."""


@dataclass(frozen=True)
class EventDef:
    """An event; ``command`` is a plugin name such as ``Ratepay/ConfirmDelivery``."""

    name: str
    manual: bool = False
    on_enter: bool = False
    timeout: timedelta | None = None
    command: str | None = None
    location: SourceLocation | None = None


@dataclass(frozen=True)
class TransitionDef:
    """``event is None`` means an event-less transition, moved by the tick when its condition
    holds (or at once on the next tick when it has no condition)."""

    source: str
    target: str
    event: str | None = None
    condition: str | None = None
    happy: bool = False
    location: SourceLocation | None = None


@dataclass(frozen=True)
class ProcessDefinition:
    """One process version (the name carries the version, e.g. ``RatepayInvoice01``)."""

    name: str
    initial: str
    states: Mapping[str, StateDef]
    events: Mapping[str, EventDef]
    transitions: tuple[TransitionDef, ...]
    files: tuple[str, ...] = field(default=())
    notify_all: bool = False
    """Notify on entering every state, whatever the states say (a deployment setting,
    ``RATEPAY_OMS_NOTIFY_STATES=all``, applied by the engine)."""

    def notifies(self, state: str) -> bool:
        """Whether an item entering ``state`` gets a state-change notification."""
        if self.notify_all:
            return True
        found = self.states.get(state)
        return found is not None and found.notify

    def transitions_from(self, state: str, event: str | None) -> tuple[TransitionDef, ...]:
        """Candidate transitions for ``event`` (``None``: event-less) leaving ``state``.

        Conditional transitions come first in declaration order, the unconditional fallback
        last: the engine takes the first whose condition passes, which reproduces Spryker's
        preference for a passing condition over a fallback.
        """
        found = [t for t in self.transitions if t.source == state and t.event == event]
        return tuple([t for t in found if t.condition] + [t for t in found if not t.condition])

    def events_from(self, state: str) -> tuple[str, ...]:
        """Names of the events that leave ``state``, in declaration order, without repeats.

        Asked once per item by manual events and the console (10,000 times for a big order),
        so the answer per state is computed once per definition (it is immutable)."""
        cache: dict[str, tuple[str, ...]] | None = self.__dict__.get("_events_from")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_events_from", cache)
        found = cache.get(state)
        if found is None:
            seen: dict[str, None] = {}
            for t in self.transitions:
                if t.source == state and t.event is not None:
                    seen.setdefault(t.event, None)
            found = cache[state] = tuple(seen)
        return found

    def on_enter_event(self, state: str) -> EventDef | None:
        for name in self.events_from(state):
            if self.events[name].on_enter:
                return self.events[name]
        return None

    def timeout_events(self, state: str) -> tuple[EventDef, ...]:
        return tuple(
            self.events[n] for n in self.events_from(state) if self.events[n].timeout is not None
        )

    def manual_events(self, state: str) -> tuple[str, ...]:
        return tuple(n for n in self.events_from(state) if self.events[n].manual)

    def has_eventless(self, state: str) -> bool:
        return any(t.source == state and t.event is None for t in self.transitions)

    def is_final(self, state: str) -> bool:
        return not any(t.source == state for t in self.transitions)
