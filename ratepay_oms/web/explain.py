"""Why each item of an order is or is not moving, in words, grouped so 1,000 items stay one
screen.

This reads only what ``order show`` already returns (items, retries, timeouts, open intents,
the lease) and the process definition. ``Engine.explain`` (issue 13) answers more (a
condition's last result and the data it read); when the engine has it, the order page shows
its answer instead (see ``app``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ratepay_oms.process.model import ProcessDefinition


@dataclass(frozen=True)
class Reason:
    state: str
    process: str
    item_ids: tuple[int, ...]
    lines: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.item_ids)


def _when(iso: str | None) -> str:
    """An ISO timestamp from ``order show`` as ``YYYY-MM-DD HH:MM:SS``."""
    return (iso or "")[:19].replace("T", " ")


def _item_lines(
    item: Mapping[str, Any],
    definition: ProcessDefinition | None,
    timeouts: Mapping[int, list[Mapping[str, Any]]],
    intents: Mapping[int, Mapping[str, Any]],
    lease: Mapping[str, Any] | None,
) -> tuple[str, ...]:
    lines: list[str] = []
    state = item["state"]
    intent = intents.get(item["id"])
    if intent is not None:
        lines.append(
            f"held by gateway-call intent {intent['id']} ({intent['status']}): no event fires "
            "until it is settled"
        )
    if lease is not None and not lease.get("expired"):
        lines.append(
            f"the order is leased by {lease['claimed_by']} "
            f"until {_when(lease['claim_expires_at'])} UTC"
        )
    if item.get("retry_at"):
        lines.append(
            f"retry of '{item['retry_event']}' due at {_when(item['retry_at'])} UTC "
            f"(attempt {item['attempts']}) after: {item.get('last_error') or 'an error'}"
        )
    for timeout in timeouts.get(item["id"], []):
        when = "overdue: the next tick fires it" if timeout["overdue"] else "due"
        lines.append(
            f"timeout event '{timeout['event']}' {when} at {_when(timeout['due_at'])} UTC"
        )
    if definition is None:
        lines.append(f"process {item['process']} is not loaded: nothing moves this item")
        return tuple(lines)
    if state not in definition.states:
        lines.append(f"state {state!r} is not in the loaded {definition.name}: nothing moves it")
        return tuple(lines)
    manual = list(definition.manual_events(state))
    if manual:
        lines.append("waits for a person: " + " or ".join(f"'{e}'" for e in manual))
    eventless = definition.transitions_from(state, None)
    for t in eventless:
        guard = f" when {t.condition} holds" if t.condition else ""
        lines.append(f"the tick moves it to '{t.target}'{guard}")
    if definition.is_final(state):
        lines.append("final state: nothing more happens")
    elif not lines:
        lines.append("no transition leaves this state without an event")
    return tuple(lines)


def explain_order(
    detail: Mapping[str, Any], definitions: Mapping[str, ProcessDefinition]
) -> list[Reason]:
    """Items grouped by state and identical reasons, in the order the items come."""
    timeouts: dict[int, list[Mapping[str, Any]]] = {}
    for timeout in detail.get("timeouts", []):
        timeouts.setdefault(timeout["item_id"], []).append(timeout)
    intents = {
        item_id: intent for intent in detail.get("intents", []) for item_id in intent["item_ids"]
    }
    groups: dict[tuple[str, str, tuple[str, ...]], list[int]] = {}
    for item in detail.get("items", []):
        lines = _item_lines(
            item, definitions.get(item["process"]), timeouts, intents, detail.get("lease")
        )
        groups.setdefault((item["process"], item["state"], lines), []).append(item["id"])
    return [
        Reason(state, process, tuple(ids), lines)
        for (process, state, lines), ids in groups.items()
    ]
