"""The OMS matrix: how many items sit in which state of which process, and for how long.

Spryker's back office shows the same table as "process performance indicators": a pile of
items in ``older`` is an order that got stuck. We add what Spryker hides: how many of those
items carry an error or wait for a retry, so a broken gateway shows up as a red column.

States past their SLA (``sla:`` in the process file, see ``console.alerts``) are marked with
how many items are past ``warn`` and ``breach``; a breach also raises the ``!`` mark.

Age buckets are computed from ``state_entered_at`` relative to ``now``: ``today`` (entered on
or after midnight UTC of ``now``'s day), ``week`` (within the seven days before ``now`` but not
today), ``older``. The bucket is a SQL ``CASE`` inside a subquery and the grouping happens
outside it, because PostgreSQL refuses to group by a ``CASE`` whose bound parameters appear
twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from ratepay_oms.console._session import session_of, utc_now
from ratepay_oms.console.alerts import sla_alerts
from ratepay_oms.persistence.models import OrderItem
from ratepay_oms.process.model import ProcessDefinition

log = logging.getLogger(__name__)

BUCKETS = ("today", "week", "older")
WEEK = timedelta(days=7)


@dataclass
class StateCell:
    """One row of the matrix: items of one process in one state."""

    state: str
    today: int = 0
    week: int = 0
    older: int = 0
    errors: int = 0
    """Items whose last event failed (``last_error`` set)."""
    retries: int = 0
    """Items with a retry scheduled (``retry_at`` set)."""
    known: bool = True
    """False when the state is not (any more) in the loaded definition of the process."""
    final: bool = False
    sla_warn: int = 0
    """Items past the state's SLA ``warn`` limit but not its ``breach`` (``console.alerts``)."""
    sla_breach: int = 0
    """Items past the state's SLA ``breach`` limit."""

    @property
    def sla(self) -> str | None:
        """``"breach"``, ``"warn"`` or ``None``: the SLA mark of the cell."""
        return "breach" if self.sla_breach else "warn" if self.sla_warn else None

    @property
    def total(self) -> int:
        return self.today + self.week + self.older

    @property
    def attention(self) -> bool:
        """The marker the table shows: something here needs a person."""
        return bool(self.errors or self.retries or not self.known or self.sla_breach)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "today": self.today,
            "week": self.week,
            "older": self.older,
            "total": self.total,
            "errors": self.errors,
            "retries": self.retries,
            "known": self.known,
            "final": self.final,
            "sla": (
                {"level": self.sla, "warn": self.sla_warn, "breach": self.sla_breach}
                if self.sla
                else None
            ),
        }


@dataclass
class ProcessRow:
    process: str
    states: list[StateCell] = field(default_factory=list)
    loaded: bool = True
    """False when no definition of this process is loaded (items left on a removed version)."""

    @property
    def total(self) -> int:
        return sum(c.total for c in self.states)

    def to_json(self) -> dict[str, Any]:
        return {
            "process": self.process,
            "loaded": self.loaded,
            "total": self.total,
            "states": [c.to_json() for c in self.states],
        }


@dataclass
class Matrix:
    now: datetime
    today_since: datetime
    week_since: datetime
    processes: list[ProcessRow]

    @property
    def total(self) -> int:
        return sum(p.total for p in self.processes)

    def counts(self) -> dict[tuple[str, str], int]:
        """``{(process, state): items}`` for the states that hold items (handy for checks)."""
        return {(p.process, c.state): c.total for p in self.processes for c in p.states if c.total}

    def to_json(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "buckets": {
                "today": {"since": self.today_since.isoformat()},
                "week": {
                    "since": self.week_since.isoformat(),
                    "until": self.today_since.isoformat(),
                },
                "older": {"until": self.week_since.isoformat()},
            },
            "total": self.total,
            "processes": [p.to_json() for p in self.processes],
        }


def bucket_bounds(now: datetime) -> tuple[datetime, datetime]:
    """(start of ``today``, start of ``week``) for ``now``; the week bucket excludes today."""
    today_since = datetime.combine(now.date(), time.min)
    return today_since, min(now - WEEK, today_since)


def _query_counts(
    session: Session, process: str | None, today_since: datetime, week_since: datetime
) -> list[Any]:
    item = OrderItem
    bucket = case(
        (item.state_entered_at >= today_since, "today"),
        (item.state_entered_at >= week_since, "week"),
        else_="older",
    ).label("bucket")
    inner = select(
        item.process.label("process"),
        item.state.label("state"),
        bucket,
        case((item.last_error.is_not(None), 1), else_=0).label("has_error"),
        case((item.retry_at.is_not(None), 1), else_=0).label("has_retry"),
    )
    if process is not None:
        inner = inner.where(item.process == process)
    sub = inner.subquery()
    stmt = select(
        sub.c.process,
        sub.c.state,
        sub.c.bucket,
        func.count().label("items"),
        func.sum(sub.c.has_error).label("errors"),
        func.sum(sub.c.has_retry).label("retries"),
    ).group_by(sub.c.process, sub.c.state, sub.c.bucket)
    return list(session.execute(stmt))


def build_matrix(
    source: Any,
    *,
    now: datetime | None = None,
    process: str | None = None,
    definitions: Mapping[str, ProcessDefinition] | None = None,
    include_empty: bool = False,
) -> Matrix:
    """Count items per process × state × age bucket.

    ``source``: an ``Engine``, a ``sessionmaker`` or a ``Session``. ``definitions`` (e.g.
    ``engine.definitions()``) orders the states as the process declares them, marks final
    states, and flags states that hold items but are unknown to the definition (left over by
    an edited process file). ``include_empty`` also lists the states of loaded processes that
    hold no items, as Spryker's matrix does.
    """
    now = now or utc_now()
    today_since, week_since = bucket_bounds(now)
    definitions = definitions or {}
    with session_of(source) as session:
        rows = _query_counts(session, process, today_since, week_since)

    cells: dict[str, dict[str, StateCell]] = {}
    for proc, state, bucket, items, errors, retries in rows:
        cell = cells.setdefault(proc, {}).setdefault(state, StateCell(state))
        setattr(cell, bucket, getattr(cell, bucket) + int(items))
        cell.errors += int(errors or 0)
        cell.retries += int(retries or 0)

    if definitions:
        with session_of(source) as session:
            report = sla_alerts(session, definitions, now=now, process=process)
        for alert in report.alerts:
            marked = cells.get(alert.process, {}).get(alert.state)
            if marked is not None:
                marked.sla_warn, marked.sla_breach = alert.warn, alert.breach

    names = set(cells)
    if include_empty:
        names |= {n for n in definitions if process is None or n == process}
    result = []
    for proc in sorted(names):
        by_state = cells.get(proc, {})
        definition = definitions.get(proc)
        row = ProcessRow(proc, loaded=definition is not None or not definitions)
        if definition is not None:
            order = list(definition.states)
            for state in order:
                if state in by_state or include_empty:
                    cell = by_state.get(state) or StateCell(state)
                    cell.final = definition.is_final(state)
                    row.states.append(cell)
            for state in sorted(set(by_state) - set(order)):
                by_state[state].known = False
                row.states.append(by_state[state])
        else:
            row.states = [by_state[s] for s in sorted(by_state)]
            if definitions:
                for cell in row.states:
                    cell.known = False
        result.append(row)
    return Matrix(now, today_since, week_since, result)


def item_states(source: Any, *, process: str | None = None) -> dict[tuple[str, str], int]:
    """``{(process, state): items}`` straight from the item table, without buckets."""
    item = OrderItem
    stmt = select(item.process, item.state, func.count()).group_by(item.process, item.state)
    if process is not None:
        stmt = stmt.where(item.process == process)
    with session_of(source) as session:
        return {(p, s): int(n) for p, s, n in session.execute(stmt)}
