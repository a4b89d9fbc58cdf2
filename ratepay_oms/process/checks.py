"""Static checks over a merged process (after includes and prefixes are applied).

These are the mistakes Spryker's OMS lets through silently and its Workflow validator or its
"common pitfalls" page warns about: names that point nowhere, duplicates where "the last one
wins", states nobody can reach, two on-enter events where only one takes effect, plugins nobody
registered. They run on declaration lists (not dicts) so a duplicate is still visible here.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ratepay_oms.process.errors import ERROR, WARNING, ProcessProblem, Severity
from ratepay_oms.process.model import EventDef, SourceLocation, StateDef, TransitionDef


class PluginLookup(Protocol):
    """What the checks need of a plugin registry (``PluginRegistry`` satisfies it)."""

    def has_command(self, name: str) -> bool: ...

    def has_condition(self, name: str) -> bool: ...


@dataclass
class Declarations:
    """Everything a process (or a lone sub-process file) declares, in file order."""

    file: str
    name: str
    initial: str | None = None
    initial_location: SourceLocation | None = None
    states: list[StateDef] = field(default_factory=list)
    events: list[EventDef] = field(default_factory=list)
    transitions: list[TransitionDef] = field(default_factory=list)


def _problem(
    loc: SourceLocation | None, fallback: str, message: str, severity: Severity = ERROR
) -> ProcessProblem:
    if loc is None:
        return ProcessProblem(fallback, None, message, severity)
    return ProcessProblem(loc.file, loc.line, message, severity)


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_declarations(
    decl: Declarations, *, registry: PluginLookup | None = None, complete: bool = True
) -> list[ProcessProblem]:
    """Every problem in ``decl``; ``complete=False`` for a sub-process file checked on its own,
    whose names may be declared by the file that includes it (so reference, reachability and
    unused-event checks would be false alarms)."""
    problems: list[ProcessProblem] = []
    problems += _duplicates(decl)
    problems += _plugins(decl, registry)
    problems += _ambiguous_fallbacks(decl)
    if complete:
        problems += _references(decl)
        problems += _reachability(decl)
        problems += _on_enter(decl)
        problems += _unused_events(decl)
        problems += _racy_states(decl)
        problems += _sla_on_final_states(decl)
    return problems


def _sla_on_final_states(decl: Declarations) -> list[ProcessProblem]:
    """An SLA on a state nothing leaves would report every item that ever finished."""
    sources = {t.source for t in decl.transitions}
    return [
        _problem(
            s.sla.location or s.location,
            decl.file,
            f"state {s.name!r} has an 'sla' but is final (no transition leaves it): every item "
            "that finishes there would breach it; remove the sla or give the state a way out",
        )
        for s in decl.states
        if s.sla is not None and s.name not in sources
    ]


def _duplicates(decl: Declarations) -> list[ProcessProblem]:
    problems = []
    for kind, items in (("state", decl.states), ("event", decl.events)):
        first: dict[str, StateDef | EventDef] = {}
        for item in items:
            if item.name in first and first[item.name].location == item.location:
                continue  # one file reached twice through includes; reported at the include
            if item.name in first:
                problems.append(
                    _problem(
                        item.location,
                        decl.file,
                        f"duplicate {kind} {item.name!r} "
                        f"(first declared at {first[item.name].location})",
                    )
                )
            else:
                first[item.name] = item
    seen: dict[tuple[str, str | None, str, str | None], TransitionDef] = {}
    for t in decl.transitions:
        key = (t.source, t.event, t.target, t.condition)
        if key in seen:
            problems.append(
                _problem(
                    t.location,
                    decl.file,
                    f"duplicate transition {_describe(t)} (first declared at {seen[key].location})",
                )
            )
        else:
            seen[key] = t
    return problems


def _describe(t: TransitionDef) -> str:
    text = f"{t.source!r} -> {t.target!r}"
    if t.event is not None:
        text += f" on {t.event!r}"
    if t.condition is not None:
        text += f" if {t.condition!r}"
    return text


def _references(decl: Declarations) -> list[ProcessProblem]:
    states = {s.name for s in decl.states}
    events = {e.name for e in decl.events}
    problems = []
    if decl.initial is not None and decl.initial not in states:
        problems.append(
            _problem(
                decl.initial_location,
                decl.file,
                f"initial state {decl.initial!r} is not a state{_suggest(decl.initial, states)}",
            )
        )
    for t in decl.transitions:
        for role, name in (("source", t.source), ("target", t.target)):
            if name not in states:
                problems.append(
                    _problem(
                        t.location,
                        decl.file,
                        f"transition {role} {name!r} is not a state{_suggest(name, states)}",
                    )
                )
        if t.event is not None and t.event not in events:
            problems.append(
                _problem(
                    t.location,
                    decl.file,
                    f"transition event {t.event!r} is not an event{_suggest(t.event, events)}",
                )
            )
    return problems


def _plugins(decl: Declarations, registry: PluginLookup | None) -> list[ProcessProblem]:
    if registry is None:
        return []
    problems = []
    for e in decl.events:
        if e.command is not None and not registry.has_command(e.command):
            problems.append(
                _problem(
                    e.location,
                    decl.file,
                    f"unknown command plugin {e.command!r} (event {e.name!r})",
                )
            )
    for t in decl.transitions:
        if t.condition is not None and not registry.has_condition(t.condition):
            problems.append(
                _problem(
                    t.location,
                    decl.file,
                    f"unknown condition plugin {t.condition!r} (transition {_describe(t)})",
                )
            )
    return problems


def _ambiguous_fallbacks(decl: Declarations) -> list[ProcessProblem]:
    """Two unconditional transitions for one (source, event): Spryker takes "the first one
    read", so the second is dead code that looks alive."""
    problems = []
    fallback: dict[tuple[str, str | None], TransitionDef] = {}
    for t in decl.transitions:
        if t.condition is not None:
            continue
        key = (t.source, t.event)
        first = fallback.setdefault(key, t)
        if first is not t and first.target != t.target:
            on = f"event {t.event!r}" if t.event is not None else "no event"
            problems.append(
                _problem(
                    t.location,
                    decl.file,
                    f"second unconditional transition from {t.source!r} on {on} "
                    f"(first at {first.location} goes to {first.target!r}); "
                    "give one of them a condition",
                )
            )
    return problems


def _reachability(decl: Declarations) -> list[ProcessProblem]:
    states = {s.name for s in decl.states}
    if decl.initial is None or decl.initial not in states:
        return []  # already reported as a bad initial state
    edges: dict[str, set[str]] = defaultdict(set)
    for t in decl.transitions:
        edges[t.source].add(t.target)
    reached = {decl.initial}
    todo = [decl.initial]
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    problems = []
    reported: set[str] = set()
    for s in decl.states:
        if s.name not in reached and s.name not in reported:
            reported.add(s.name)
            problems.append(
                _problem(
                    s.location,
                    decl.file,
                    f"state {s.name!r} is unreachable from the initial state {decl.initial!r}",
                )
            )
    return problems


def _events_leaving(decl: Declarations) -> dict[str, list[str]]:
    leaving: dict[str, list[str]] = defaultdict(list)
    for t in decl.transitions:
        if t.event is not None and t.event not in leaving[t.source]:
            leaving[t.source].append(t.event)
    return leaving


_Named = TypeVar("_Named", StateDef, EventDef)


def _first_by_name(items: Sequence[_Named]) -> dict[str, _Named]:
    found: dict[str, _Named] = {}
    for item in items:
        found.setdefault(item.name, item)
    return found


def _on_enter(decl: Declarations) -> list[ProcessProblem]:
    events = _first_by_name(decl.events)
    states = _first_by_name(decl.states)
    problems = []
    for source, names in _events_leaving(decl).items():
        on_enter = [n for n in names if n in events and events[n].on_enter]
        if len(on_enter) > 1 and source in states:
            listed = ", ".join(repr(n) for n in on_enter)
            problems.append(
                _problem(
                    states[source].location,
                    decl.file,
                    f"state {source!r} has more than one on_enter event ({listed}); "
                    "only one takes effect: chain them or guard one with a condition",
                )
            )
    return problems


def _unused_events(decl: Declarations) -> list[ProcessProblem]:
    used = {t.event for t in decl.transitions}
    return [
        _problem(
            e.location,
            decl.file,
            f"event {e.name!r} is declared but no transition uses it",
            WARNING,
        )
        for e in decl.events
        if e.name not in used
    ]


def _racy_states(decl: Declarations) -> list[ProcessProblem]:
    """Spryker's docs: a polled condition, a timeout and a manual event on one state race each
    other, because different cron jobs (or a person) move the item in no defined order."""
    events = _first_by_name(decl.events)
    states = _first_by_name(decl.states)
    polled = {t.source for t in decl.transitions if t.event is None and t.condition is not None}
    problems = []
    for source, names in _events_leaving(decl).items():
        defs = [events[n] for n in names if n in events]
        has_timeout = any(e.timeout is not None for e in defs)
        has_manual = any(e.manual for e in defs)
        if source in polled and has_timeout and has_manual and source in states:
            problems.append(
                _problem(
                    states[source].location,
                    decl.file,
                    f"state {source!r} mixes a polled condition, a timeout and a manual event; "
                    "they race each other (check the condition after the timeout instead)",
                    WARNING,
                )
            )
    return problems
