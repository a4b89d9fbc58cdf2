"""Set-based writes of what the runner decided: state moves, history, log, timeouts.

A tick may move thousands of items the same way (same source, event and target), so they go
to the database as one ``UPDATE … WHERE id IN (…)`` per such group and one multi-row INSERT for
each audit table (plain Core on the tables: the ORM's bulk path costs more than the SQL), not as
one ORM flush per row. The ORM objects the runner still holds get the
written values as their *committed* state, so the session neither re-writes nor re-reads them.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import delete, insert, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from ratepay_oms.persistence.models import EventTimeout, OrderItem, StateHistory, TransitionLog
from ratepay_oms.process.model import ProcessDefinition

CHUNK = 1000
"""Ids per ``IN (…)`` list: well under every dialect's bind-parameter limit."""

T = TypeVar("T")


def chunked(values: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


@dataclass(frozen=True)
class Origin:
    """Who wrote a log row: the machine and the program (Spryker's ``hostname``/``path``)."""

    hostname: str
    argv: str

    @classmethod
    def current(cls) -> Origin:
        argv = " ".join([os.path.basename(sys.argv[0]) if sys.argv else "", *sys.argv[1:]])
        return cls(hostname=socket.gethostname()[:255], argv=argv.strip()[:2000])


@dataclass(frozen=True)
class Move:
    """One item taking one transition (``condition`` is the one that let it pass, if any)."""

    item: OrderItem
    process: str
    source: str
    target: str
    event: str | None
    command: str | None
    condition: str | None


_CLEARED_RETRY: dict[str, Any] = {
    "retry_event": None,
    "retry_at": None,
    "attempts": 0,
    "last_error": None,
}


class StateWriter:
    """Buffers log rows and writes moves for one unit of work (one open transaction)."""

    def __init__(self, session: Session, now: datetime, origin: Origin) -> None:
        self.session = session
        self.now = now
        self.origin = origin
        self._log_rows: list[dict[str, Any]] = []

    # -- transition log ------------------------------------------------------------------

    def log(
        self,
        item: OrderItem,
        *,
        process: str,
        event: str | None,
        source: str,
        target: str | None,
        command: str | None = None,
        condition: str | None = None,
        error: str | None = None,
    ) -> None:
        self._log_rows.append(
            {
                "item_id": item.id,
                "order_id": item.order_id,
                "process": process,
                "event": event,
                "source_state": source,
                "target_state": target,
                "command": command,
                "condition": condition,
                "is_error": error is not None,
                "error_message": error,
                "hostname": self.origin.hostname,
                "argv": self.origin.argv,
                "created_at": self.now,
            }
        )

    def flush_log(self) -> None:
        if self._log_rows:
            rows, self._log_rows = self._log_rows, []
            for part in chunked(rows):
                self.session.execute(insert(TransitionLog.__table__), list(part))

    # -- entering states -----------------------------------------------------------------

    def enter_initial(self, items: Sequence[OrderItem], definition: ProcessDefinition) -> None:
        """History rows from ``None`` and the initial state's timeouts for new items."""
        if not items:
            return
        self._history([(i, None, definition.initial, None) for i in items])
        self._arm_timeouts([(i, definition.initial) for i in items], definition)

    def write_moves(self, moves: Sequence[Move], definitions: dict[str, ProcessDefinition]) -> None:
        """Persist ``moves`` (one transaction with whatever else the caller wrote)."""
        if not moves:
            self.flush_log()
            return
        by_target: dict[str, list[int]] = defaultdict(list)
        for move in moves:
            by_target[move.target].append(move.item.id)
        for target, ids in by_target.items():
            for part in chunked(ids):
                self.session.execute(
                    update(OrderItem)
                    .where(OrderItem.id.in_(part))
                    .values(state=target, state_entered_at=self.now, **_CLEARED_RETRY)
                    .execution_options(synchronize_session=False)
                )
        for move in moves:
            item = move.item
            set_committed_value(item, "state", move.target)
            set_committed_value(item, "state_entered_at", self.now)
            if item.attempts or item.retry_at is not None or item.last_error is not None:
                for key, value in _CLEARED_RETRY.items():
                    set_committed_value(item, key, value)
            self.log(
                item,
                process=move.process,
                event=move.event,
                source=move.source,
                target=move.target,
                command=move.command,
                condition=move.condition,
            )
        self._history([(m.item, m.source, m.target, m.event) for m in moves])
        moved_ids = [m.item.id for m in moves]
        for part in chunked(moved_ids):
            self.session.execute(delete(EventTimeout).where(EventTimeout.item_id.in_(part)))
        arm: dict[str, list[tuple[OrderItem, str]]] = defaultdict(list)
        for move in moves:
            arm[move.process].append((move.item, move.target))
        for process, entries in arm.items():
            self._arm_timeouts(entries, definitions[process])
        self.flush_log()

    def clear_retry(self, items: Iterable[OrderItem]) -> None:
        """Items whose event went through without moving them: the retry is settled."""
        ids = [i.id for i in items if i.retry_at is not None or i.attempts or i.retry_event]
        for part in chunked(ids):
            self.session.execute(
                update(OrderItem)
                .where(OrderItem.id.in_(part))
                .values(**_CLEARED_RETRY)
                .execution_options(synchronize_session=False)
            )
        for item in items:
            if item.id in ids:
                for key, value in _CLEARED_RETRY.items():
                    set_committed_value(item, key, value)

    # -- helpers ---------------------------------------------------------------------------

    def _history(self, rows: Sequence[tuple[OrderItem, str | None, str, str | None]]) -> None:
        values = [
            {
                "item_id": item.id,
                "order_id": item.order_id,
                "from_state": source,
                "to_state": target,
                "event": event,
                "created_at": self.now,
            }
            for item, source, target, event in rows
        ]
        for part in chunked(values):
            self.session.execute(insert(StateHistory.__table__), list(part))

    def _arm_timeouts(
        self, entries: Sequence[tuple[OrderItem, str]], definition: ProcessDefinition
    ) -> None:
        rows: list[dict[str, Any]] = []
        cache: dict[str, tuple[Any, ...]] = {}
        for item, state in entries:
            events = cache.get(state)
            if events is None:
                events = cache[state] = definition.timeout_events(state)
            for event in events:
                assert event.timeout is not None
                rows.append(
                    {
                        "item_id": item.id,
                        "state": state,
                        "event": event.name,
                        "due_at": self.now + event.timeout,
                    }
                )
        for part in chunked(rows):
            self.session.execute(insert(EventTimeout.__table__), list(part))
