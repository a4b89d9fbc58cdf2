"""Why an item is where it is, and why it does not move: ``Engine.explain`` / ``explain``.

The question operators of every OMS ask ("why did this condition not fire?", "why is this
order stuck?") is answered from what the engine wrote, not from guesses: the item's state and
since when, every transition out of that state (event, how it fires, command, condition), and
how it came there (the last move, and the conditions asked at that moment: a false one is why
a fallback transition brought it to an error state), and the reasons it is not moving now, each
with its time:

- ``final``: nothing leaves the state;
- ``intent``: it waits on an open gateway-call intent (nothing fires until it is settled);
- ``lease``: a worker holds the order's lease until T;
- ``retry``: its event failed with error E and is retried at T (``error``: failed, no retry);
- ``condition``: condition C returned false at T, with what it read (``oms_condition_result``,
  recorded by the engine whenever a condition is asked);
- ``timeout``: timeout event X is due at T;
- ``manual``: it waits for a person to fire manual event X;
- ``on_enter`` / ``eventless``: the next tick moves it (an on-enter event not fired yet, an
  event-less transition without a condition);
- ``unknown_process`` / ``unknown_state``: the definition it was on is not loaded.

Read-only: one session, no lease taken, nothing written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ratepay_oms.engine.clock import wall_now
from ratepay_oms.engine.errors import OrderNotFoundError
from ratepay_oms.engine.intents import IntentView, list_intents
from ratepay_oms.errors import OmsError
from ratepay_oms.persistence.conditions import ConditionResult
from ratepay_oms.persistence.models import EventTimeout, Order, OrderItem, StateHistory
from ratepay_oms.process.loader import format_elapsed, format_timeout
from ratepay_oms.process.model import ProcessDefinition, TransitionDef

MANUAL = "manual"
ON_ENTER = "on-enter"
TIMEOUT = "timeout"
EVENTLESS = "event-less"

FINAL = "final"
BLOCKED = "blocked"
DUE = "due"
WAITING = "waiting"


class ExplainError(OmsError):
    """``explain`` was asked about an item the order does not have."""


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _fmt(moment: datetime) -> str:
    return moment.replace(microsecond=0).isoformat(sep=" ")


def _span(start: datetime, end: datetime) -> str:
    """``3 days 4 hours`` between two times (see ``format_elapsed``)."""
    if end < start:
        return "0 seconds (after the given now)"
    return format_elapsed(end - start)


@dataclass(frozen=True)
class ConditionCheck:
    """The newest recorded answer of one condition for one item."""

    condition: str
    result: bool
    evaluated_at: datetime
    state: str
    event: str | None
    read: dict[str, Any] | None

    @classmethod
    def of(cls, row: ConditionResult) -> ConditionCheck:
        return cls(
            condition=row.condition,
            result=bool(row.result),
            evaluated_at=row.evaluated_at,
            state=row.state,
            event=row.event,
            read=json.loads(row.detail) if row.detail else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "result": self.result,
            "evaluated_at": _iso(self.evaluated_at),
            "state": self.state,
            "event": self.event,
            "read": self.read,
        }


@dataclass(frozen=True)
class TransitionOut:
    """One transition leaving the item's state, with how its event fires."""

    event: str | None
    kinds: tuple[str, ...]
    target: str
    command: str | None
    condition: str | None
    happy: bool
    timeout: str | None = None
    last_check: ConditionCheck | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "kinds": list(self.kinds),
            "target": self.target,
            "command": self.command,
            "condition": self.condition,
            "happy": self.happy,
            "timeout": self.timeout,
            "last_check": self.last_check.to_json() if self.last_check else None,
        }


@dataclass(frozen=True)
class Reason:
    """One reason the item is not moving now (``kind`` from the module docstring)."""

    kind: str
    message: str
    at: datetime | None = None
    """When it is due, or when it was observed (a condition's evaluation)."""
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "at": _iso(self.at),
                **({"detail": self.detail} if self.detail else {})}


@dataclass(frozen=True)
class Arrival:
    """How the item came into its state: the last history row, and the conditions asked in
    the state it left at that moment (a false one is why a fallback brought it here)."""

    from_state: str | None
    event: str | None
    at: datetime
    forced: bool = False
    actor: str | None = None
    reason: str | None = None
    conditions: tuple[ConditionCheck, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "from_state": self.from_state,
            "event": self.event,
            "at": _iso(self.at),
            "forced": self.forced,
            "actor": self.actor,
            "reason": self.reason,
            "conditions": [c.to_json() for c in self.conditions],
        }

    def describe(self) -> str:
        if self.forced:
            return (f"forced here from {self.from_state!r} at {_fmt(self.at)} by {self.actor}: "
                    f"{self.reason}")
        if self.from_state is None:
            return f"placed at {_fmt(self.at)}"
        how = f"by {self.event!r}" if self.event else "by an event-less transition"
        text = f"came from {self.from_state!r} {how} at {_fmt(self.at)}"
        for check in self.conditions:
            answer = "true" if check.result else "false"
            read = f" (read {json.dumps(check.read, sort_keys=True)})" if check.read else ""
            text += f"; condition {check.condition} returned {answer}{read}"
        return text


@dataclass(frozen=True)
class ItemExplanation:
    item_id: int
    sku: str
    process: str
    state: str
    since: datetime
    status: str
    """``final``, ``blocked`` (intent or lease), ``due`` (the next tick acts) or ``waiting``."""
    transitions: tuple[TransitionOut, ...]
    reasons: tuple[Reason, ...]
    now: datetime
    arrival: Arrival | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "arrival": self.arrival.to_json() if self.arrival else None,
            "item_id": self.item_id,
            "sku": self.sku,
            "process": self.process,
            "state": self.state,
            "since": _iso(self.since),
            "in_state_for": _span(self.since, self.now),
            "status": self.status,
            "transitions": [t.to_json() for t in self.transitions],
            "reasons": [r.to_json() for r in self.reasons],
        }


@dataclass(frozen=True)
class OrderExplanation:
    order_ref: str
    process: str
    now: datetime
    items: tuple[ItemExplanation, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "order_ref": self.order_ref,
            "process": self.process,
            "now": _iso(self.now),
            "items": [i.to_json() for i in self.items],
        }


def _kinds(definition: ProcessDefinition, t: TransitionDef) -> tuple[str, ...]:
    if t.event is None:
        return (EVENTLESS,)
    event = definition.events.get(t.event)
    if event is None:
        return ()
    kinds = []
    if event.manual:
        kinds.append(MANUAL)
    if event.on_enter:
        kinds.append(ON_ENTER)
    if event.timeout is not None:
        kinds.append(TIMEOUT)
    return tuple(kinds)


class _Explainer:
    """Reasons for one item, from rows read once for the whole order."""

    def __init__(
        self,
        order: Order,
        definitions: Mapping[str, ProcessDefinition],
        now: datetime,
        intents: Mapping[int, IntentView],
        timeouts: Mapping[int, Sequence[EventTimeout]],
        checks: Mapping[int, Sequence[ConditionResult]],
        arrivals: Mapping[int, StateHistory],
    ) -> None:
        self.arrivals = arrivals
        self.order = order
        self.definitions = definitions
        self.now = now
        self.intents = intents
        self.timeouts = timeouts
        self.checks = checks

    def item(self, item: OrderItem) -> ItemExplanation:
        definition = self.definitions.get(item.process)
        reasons: list[Reason] = []
        transitions: tuple[TransitionOut, ...] = ()
        checks = {
            r.condition: ConditionCheck.of(r)
            for r in self.checks.get(item.id, ())
            if r.state == item.state
        }
        if definition is None:
            reasons.append(Reason(
                "unknown_process",
                f"process {item.process!r} is not loaded: nothing can move this item until its "
                "file is back (or 'process migrate' moves it to a loaded version)",
            ))
        elif item.state not in definition.states:
            reasons.append(Reason(
                "unknown_state",
                f"state {item.state!r} is not in process {item.process}: move it with "
                "'order move' or 'process migrate'",
            ))
        else:
            transitions = self._transitions(definition, item.state, checks)
        reasons += self._blockers(item)
        if definition is not None and item.state in definition.states:
            reasons += self._waits(definition, item, transitions, checks)
        return ItemExplanation(
            arrival=self._arrival(item),
            item_id=item.id,
            sku=item.sku,
            process=item.process,
            state=item.state,
            since=item.state_entered_at,
            status=_status(reasons),
            transitions=transitions,
            reasons=tuple(reasons),
            now=self.now,
        )

    def _arrival(self, item: OrderItem) -> Arrival | None:
        row = self.arrivals.get(item.id)
        if row is None:
            return None
        asked = tuple(
            ConditionCheck.of(c)
            for c in self.checks.get(item.id, ())
            if c.state == row.from_state and c.evaluated_at == row.created_at
        )
        return Arrival(row.from_state, row.event, row.created_at, bool(row.forced), row.actor,
                       row.reason, asked)

    def _transitions(
        self, definition: ProcessDefinition, state: str, checks: Mapping[str, ConditionCheck]
    ) -> tuple[TransitionOut, ...]:
        out = []
        for t in definition.transitions:
            if t.source != state:
                continue
            event = definition.events.get(t.event) if t.event is not None else None
            out.append(TransitionOut(
                event=t.event,
                kinds=_kinds(definition, t),
                target=t.target,
                command=event.command if event is not None else None,
                condition=t.condition,
                happy=t.happy,
                timeout=format_timeout(event.timeout) if event and event.timeout else None,
                last_check=checks.get(t.condition) if t.condition else None,
            ))
        return tuple(out)

    def _blockers(self, item: OrderItem) -> list[Reason]:
        reasons = []
        if item.intent_id is not None:
            intent = self.intents.get(item.intent_id)
            text = intent.explain() if intent is not None else "its status is not readable"
            reasons.append(Reason(
                "intent",
                f"waits for gateway call intent {item.intent_id}: {text}",
                intent.created_at if intent is not None else None,
                {"intent_id": item.intent_id,
                 "status": intent.status if intent is not None else None,
                 "command": intent.command if intent is not None else None},
            ))
        until = self.order.claim_expires_at
        if self.order.claimed_by and until is not None and until > wall_now():
            reasons.append(Reason(
                "lease",
                f"lease held by worker {self.order.claimed_by} until {_fmt(until)} UTC",
                until,
                {"worker": self.order.claimed_by},
            ))
        if item.retry_at is not None:
            due = item.retry_at <= self.now
            when = "due now: the next tick retries it" if due else f"due at {_fmt(item.retry_at)}"
            reasons.append(Reason(
                "retry",
                f"retry of {item.retry_event or '(event-less)'} {when} after error "
                f"{item.last_error or '(none recorded)'} (attempt {item.attempts})",
                item.retry_at,
                {"event": item.retry_event, "attempts": item.attempts, "error": item.last_error,
                 "due": due},
            ))
        elif item.last_error:
            reasons.append(Reason("error", f"last error: {item.last_error}"))
        return reasons

    def _waits(
        self,
        definition: ProcessDefinition,
        item: OrderItem,
        transitions: Sequence[TransitionOut],
        checks: Mapping[str, ConditionCheck],
    ) -> list[Reason]:
        if not transitions:
            return [Reason(FINAL, f"final state: no transition leaves {item.state!r}")]
        reasons: list[Reason] = []
        for check in checks.values():
            if check.result:
                continue
            on = f"for {check.event!r}" if check.event else "(event-less, asked on every tick)"
            read = f"; it read {json.dumps(check.read, sort_keys=True)}" if check.read else ""
            reasons.append(Reason(
                "condition",
                f"condition {check.condition} returned false at {_fmt(check.evaluated_at)} "
                f"{on}{read}",
                check.evaluated_at,
                check.to_json(),
            ))
        asked = set(checks)
        for t in transitions:
            if EVENTLESS in t.kinds:
                if t.condition is None:
                    reasons.append(Reason(
                        "eventless", f"event-less transition to {t.target!r}: the next tick "
                        "takes it"))
                elif t.condition not in asked:
                    reasons.append(Reason(
                        "condition", f"condition {t.condition} (event-less, to {t.target!r}) "
                        "has not been asked yet: the next tick asks it"))
        for row in self.timeouts.get(item.id, ()):
            if row.state != item.state:
                continue
            due = row.due_at <= self.now
            when = "overdue: the next tick fires it" if due else \
                f"due at {_fmt(row.due_at)} (in {_span(self.now, row.due_at)})"
            reasons.append(Reason(
                "timeout", f"timeout {row.event!r} {when}", row.due_at,
                {"event": row.event, "due": due}))
        for name in definition.manual_events(item.state):
            reasons.append(Reason(
                "manual",
                f"waiting for manual event {name!r} (ratepay-oms event {json.dumps(name)} "
                f"{self.order.order_ref} --item {item.id})",
                detail={"event": name},
            ))
        on_enter = definition.on_enter_event(item.state)
        if on_enter is not None and item.retry_at is None and item.intent_id is None:
            ran = any(c.event == on_enter.name for c in checks.values())
            if not ran:
                reasons.append(Reason(
                    "on_enter", f"on-enter event {on_enter.name!r} has not fired yet: the next "
                    "tick fires it", detail={"event": on_enter.name}))
        return reasons


def _status(reasons: Sequence[Reason]) -> str:
    kinds = {r.kind for r in reasons}
    if FINAL in kinds:
        return FINAL
    if kinds & {"intent", "lease", "unknown_process", "unknown_state"}:
        return BLOCKED
    due = any(
        r.kind in ("on_enter", "eventless")
        or (r.kind in ("retry", "timeout") and r.detail.get("due"))
        for r in reasons
    )
    return DUE if due else WAITING


def explain_order(
    session: Session,
    definitions: Mapping[str, ProcessDefinition],
    order_ref: str,
    *,
    item_id: int | None = None,
    now: datetime,
) -> OrderExplanation:
    """Explain every item of ``order_ref`` (or only ``item_id``) at ``now``."""
    order = session.scalar(select(Order).where(Order.order_ref == order_ref))
    if order is None:
        raise OrderNotFoundError(f"no order {order_ref!r}")
    query = select(OrderItem).where(OrderItem.order_id == order.id).order_by(OrderItem.id)
    items = list(session.scalars(query))
    if item_id is not None:
        items = [i for i in items if i.id == item_id]
        if not items:
            raise ExplainError(f"item {item_id} is not an item of order {order_ref}")
    ids = [i.id for i in items]
    timeouts: dict[int, list[EventTimeout]] = {}
    for row in session.scalars(
        select(EventTimeout).where(EventTimeout.item_id.in_(ids)).order_by(EventTimeout.due_at)
    ):
        timeouts.setdefault(row.item_id, []).append(row)
    checks: dict[int, list[ConditionResult]] = {}
    for check in session.scalars(
        select(ConditionResult)
        .where(ConditionResult.order_id == order.id, ConditionResult.item_id.in_(ids))
        .order_by(ConditionResult.evaluated_at, ConditionResult.id)
    ):
        checks.setdefault(check.item_id, []).append(check)
    intents = {v.id: v for v in list_intents(session, order_id=order.id, open_only=False)
               if v.id in {i.intent_id for i in items}}
    arrivals: dict[int, StateHistory] = {}
    for entry in session.scalars(
        select(StateHistory)
        .where(StateHistory.order_id == order.id, StateHistory.item_id.in_(ids))
        .order_by(StateHistory.id)
    ):
        arrivals[entry.item_id] = entry  # the newest wins
    explainer = _Explainer(order, definitions, now, intents, timeouts, checks, arrivals)
    return OrderExplanation(
        order_ref=order.order_ref,
        process=order.process,
        now=now,
        items=tuple(explainer.item(i) for i in items),
    )
