"""SLA alerts: items that sit in a state longer than the process file allows.

A state may carry ``sla: {warn: 1d, breach: 3d}`` (``docs/process-format.md``). Operators of
every OMS ask for the same thing: tell me when items pile up somewhere, before the customer
does. ``sla_alerts`` answers it per process and state, with how many items are past each limit
and the oldest of them, so a monitor can run ``ratepay-oms alerts`` and page on its exit status
(:data:`BREACH_EXIT_CODE`), and ``matrix`` marks the same cells.

Time in a state is measured from ``state_entered_at`` (what the matrix uses too); a forced move
or a process migration restarts it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, literal, select

from ratepay_oms.console._session import session_of, utc_now
from ratepay_oms.persistence.models import Order, OrderItem
from ratepay_oms.process.loader import format_elapsed, format_timeout
from ratepay_oms.process.model import ProcessDefinition, SlaDef

BREACH_EXIT_CODE = 3
"""``ratepay-oms alerts`` exits with this when any item is past a ``breach`` limit (0 when
none is, warnings included; 1 for an error, 2 for a usage mistake)."""

WARN = "warn"
BREACH = "breach"


@dataclass(frozen=True)
class SlaAlert:
    """Items of one process and state past their limits."""

    process: str
    state: str
    sla: SlaDef
    warn: int
    """Items past ``warn`` but not past ``breach``."""
    breach: int
    oldest_entered_at: datetime
    oldest_order_ref: str
    oldest_item_id: int
    now: datetime

    @property
    def level(self) -> str:
        return BREACH if self.breach else WARN

    @property
    def items(self) -> int:
        return self.warn + self.breach

    @property
    def oldest_waited(self) -> timedelta:
        return self.now - self.oldest_entered_at

    def to_json(self) -> dict[str, Any]:
        return {
            "process": self.process,
            "state": self.state,
            "level": self.level,
            "limits": {
                WARN: _fmt(self.sla.warn),
                BREACH: _fmt(self.sla.breach),
            },
            "items": self.items,
            "warn": self.warn,
            "breach": self.breach,
            "oldest": {
                "order_ref": self.oldest_order_ref,
                "item_id": self.oldest_item_id,
                "state_entered_at": self.oldest_entered_at.isoformat(),
                "waited_seconds": int(self.oldest_waited.total_seconds()),
                "waited": format_elapsed(self.oldest_waited),
            },
        }


@dataclass(frozen=True)
class AlertReport:
    now: datetime
    alerts: list[SlaAlert]
    checked: int
    """How many (process, state) pairs carry an SLA."""

    @property
    def breached(self) -> bool:
        return any(a.breach for a in self.alerts)

    @property
    def exit_code(self) -> int:
        return BREACH_EXIT_CODE if self.breached else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "breached": self.breached,
            "states_with_sla": self.checked,
            "totals": {
                WARN: sum(a.warn for a in self.alerts),
                BREACH: sum(a.breach for a in self.alerts),
            },
            "alerts": [a.to_json() for a in self.alerts],
        }


def _fmt(value: timedelta | None) -> str | None:
    return format_timeout(value) if value is not None else None


def sla_states(
    definitions: Mapping[str, ProcessDefinition], process: str | None = None
) -> list[tuple[str, str, SlaDef]]:
    """``(process, state, sla)`` for every state with an SLA, in declaration order."""
    return [
        (name, state.name, state.sla)
        for name, definition in sorted(definitions.items())
        if process is None or name == process
        for state in definition.states.values()
        if state.sla is not None
    ]


def sla_alerts(
    source: Any,
    definitions: Mapping[str, ProcessDefinition],
    *,
    now: datetime | None = None,
    process: str | None = None,
) -> AlertReport:
    """Every (process, state) whose items are past their SLA at ``now``.

    ``source``: an ``Engine``, a ``sessionmaker`` or a ``Session``. One aggregate query per
    state with an SLA (counted on the ``(process, state)`` index), one for each oldest item.
    """
    now = now or utc_now()
    targets = sla_states(definitions, process)
    alerts: list[SlaAlert] = []
    with session_of(source) as session:
        for proc, state, sla in targets:
            limits = [x for x in (sla.warn, sla.breach) if x is not None]
            first = now - min(limits)
            breach_since = now - sla.breach if sla.breach is not None else None
            item = OrderItem
            breach_count = (
                func.sum(case((item.state_entered_at <= breach_since, 1), else_=0))
                if breach_since is not None
                else literal(0)
            )
            where = (item.process == proc, item.state == state, item.state_entered_at <= first)
            total, breached, oldest = session.execute(
                select(func.count(), breach_count, func.min(item.state_entered_at)).where(*where)
            ).one()
            if not total:
                continue
            oldest_item, oldest_ref = session.execute(
                select(item.id, Order.order_ref)
                .join(Order, Order.id == item.order_id)
                .where(*where, item.state_entered_at == oldest)
                .order_by(item.id)
                .limit(1)
            ).one()
            breached = int(breached or 0)
            alerts.append(
                SlaAlert(
                    process=proc,
                    state=state,
                    sla=sla,
                    warn=int(total) - breached,
                    breach=breached,
                    oldest_entered_at=oldest,
                    oldest_order_ref=oldest_ref,
                    oldest_item_id=oldest_item,
                    now=now,
                )
            )
    alerts.sort(key=lambda a: (a.level != BREACH, a.process, a.state))
    return AlertReport(now=now, alerts=alerts, checked=len(targets))
