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


@dataclass(frozen=True)
class Line:
    template: str
    """Text with ``{when}`` where the time goes (other braces doubled)."""
    when: str | None = None


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _plain(text: str) -> Line:
    return Line(_escape(text))


def _when(iso: str | None) -> str:
    """An ISO timestamp from ``order show`` as ``YYYY-MM-DD HH:MM:SS``."""
    return (iso or "")[:19].replace("T", " ")


def _item_lines(
    item: Mapping[str, Any],
    definition: ProcessDefinition | None,
    timeouts: Mapping[int, list[Mapping[str, Any]]],
    intents: Mapping[int, Mapping[str, Any]],
    lease: Mapping[str, Any] | None,
    memo: dict[tuple[str, str, bool], tuple[Line, ...]],
) -> tuple[Line, ...]:
    """The reasons for one item; a time goes in ``{when}`` so items that differ only in it
    share a line (1,000 items shipped one by one are one line, not 1,000)."""
    lines: list[Line] = []
    state = item["state"]
    intent = intents.get(item["id"])
    if intent is not None:
        lines.append(_plain(
            f"held by gateway-call intent {intent['id']} ({intent['status']}): no event fires "
            "until it is settled"
        ))
    if lease is not None and not lease.get("expired"):
        lines.append(Line(
            _escape(f"the order is leased by {lease['claimed_by']} until ") + "{when} UTC",
            _when(lease["claim_expires_at"]),
        ))
    if item.get("retry_at"):
        lines.append(Line(
            _escape(f"retry of '{item['retry_event']}' due at ") + "{when}"
            + _escape(f" UTC after: {item.get('last_error') or 'an error'}"),
            _when(item["retry_at"]),
        ))
    for timeout in timeouts.get(item["id"], []):
        when = "overdue: the next tick fires it" if timeout["overdue"] else "due"
        lines.append(Line(
            _escape(f"timeout event '{timeout['event']}' {when} at ") + "{when} UTC",
            _when(timeout["due_at"]),
        ))
    key = (item["process"], state, bool(lines))
    if key not in memo:
        memo[key] = _state_lines(definition, item["process"], state, bool(lines))
    return (*lines, *memo[key])


def _state_lines(
    definition: ProcessDefinition | None, process: str, state: str, has_other: bool
) -> tuple[Line, ...]:
    """What the process says about ``state`` (the same for every item in it: computed once per
    state and order, see ``explain_order``)."""
    if definition is None:
        return (_plain(f"process {process} is not loaded: nothing moves this item"),)
    if state not in definition.states:
        return (
            _plain(f"state {state!r} is not in the loaded {definition.name}: nothing moves it"),
        )
    lines = []
    manual = list(definition.manual_events(state))
    if manual:
        lines.append(_plain("waits for a person: " + " or ".join(f"'{e}'" for e in manual)))
    for t in definition.transitions_from(state, None):
        guard = f" when {t.condition} holds" if t.condition else ""
        lines.append(_plain(f"the tick moves it to '{t.target}'{guard}"))
    if definition.is_final(state):
        lines.append(_plain("final state: nothing more happens"))
    elif not lines and not has_other:
        lines.append(_plain("no transition leaves this state without an event"))
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
    memo: dict[tuple[str, str, bool], tuple[Line, ...]] = {}
    groups: dict[tuple[str, str, tuple[str, ...]], list[tuple[int, tuple[Line, ...]]]] = {}
    for item in detail.get("items", []):
        lines = _item_lines(
            item, definitions.get(item["process"]), timeouts, intents, detail.get("lease"), memo
        )
        key = (item["process"], item["state"], tuple(line.template for line in lines))
        groups.setdefault(key, []).append((item["id"], lines))
    reasons = []
    for (process, state, templates), members in groups.items():
        texts = []
        for index, template in enumerate(templates):
            times = sorted({w for m in members if (w := m[1][index].when)})
            when = f"{times[0]} … {times[-1]}" if len(times) > 1 else "".join(times)
            texts.append(template.format(when=when))
        reasons.append(Reason(state, process, tuple(m[0] for m in members), tuple(texts)))
    return reasons
