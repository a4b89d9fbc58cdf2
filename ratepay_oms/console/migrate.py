"""Moving running items from one process version to another with an explicit state map.

Spryker has no migration of in-flight items: a breaking change gets a new process name
(``RatepayInvoice01`` → ``RatepayInvoice02``) and old orders finish on the old one. When they
cannot (a bug in the old version, a retired gateway call), an operator moves them here, with a
map ``{old state: new state}`` written down in a file that can be reviewed.

The plan is checked completely before anything is written: every state a running item of FROM
sits in must be mapped, every target must be a state of TO, and no order may be leased by a
live worker. Then one transaction moves the items, writes a history and a transition-log row
per item (event ``process migration``), re-arms the timeouts of the new state from now, clears
pending retries (their event belongs to the old process), and points orders whose items all
moved at TO. Items in a final state of FROM are running no more: they move only if their
state is mapped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import delete, func, insert, select, update

from ratepay_oms.console._session import ConsoleError, session_of, utc_now
from ratepay_oms.persistence.models import (
    EventTimeout,
    Order,
    OrderItem,
    StateHistory,
    TransitionLog,
)
from ratepay_oms.process.model import ProcessDefinition

log = logging.getLogger(__name__)

MIGRATION_EVENT = "process migration"
BATCH = 500


class MigrationError(ConsoleError):
    """The migration was refused; nothing was changed."""


@dataclass
class MigrationPlan:
    source: str
    target: str
    moves: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(old state, new state) → items."""
    left: Counter[str] = field(default_factory=Counter)
    """Final-state items of FROM that stay (their state is not mapped)."""
    orders: int = 0
    item_ids: list[int] = field(default_factory=list)

    @property
    def items(self) -> int:
        return sum(self.moves.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.source,
            "to": self.target,
            "items": self.items,
            "orders": self.orders,
            "moves": [
                {"from_state": a, "to_state": b, "items": n}
                for (a, b), n in sorted(self.moves.items())
            ],
            "left_in_final_states": dict(sorted(self.left.items())),
        }


def load_state_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{old: new}`` from a YAML or JSON file (JSON is read as YAML, which contains it)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MigrationError(f"cannot read state map {os.fspath(path)}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MigrationError(f"state map {os.fspath(path)} is not YAML/JSON: {exc}") from None
    return check_state_map(data, str(path))


def check_state_map(data: Any, where: str = "state map") -> dict[str, str]:
    if not isinstance(data, Mapping) or not data:
        raise MigrationError(f"{where}: expected a non-empty mapping {{old state: new state}}")
    result: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, str) or not value.strip():
            raise MigrationError(
                f"{where}: {key!r}: {value!r}: both sides must be state names (text)"
            )
        result[key] = value
    return result


def plan_migration(
    source: Any,
    definitions: Mapping[str, ProcessDefinition],
    from_process: str,
    to_process: str,
    state_map: Mapping[str, str],
    *,
    now: datetime | None = None,
) -> MigrationPlan:
    """Check the migration and say what it would do; raises ``MigrationError`` with every
    reason when it must be refused. Reads only."""
    now = now or utc_now()
    with session_of(source) as session:
        return _plan(session, definitions, from_process, to_process, state_map, now)


def _plan(
    session: Any,
    definitions: Mapping[str, ProcessDefinition],
    from_process: str,
    to_process: str,
    state_map: Mapping[str, str],
    now: datetime,
) -> MigrationPlan:
    if from_process == to_process:
        raise MigrationError("FROM and TO are the same process")
    target = definitions.get(to_process)
    if target is None:
        known = ", ".join(sorted(definitions)) or "none"
        raise MigrationError(f"no process {to_process!r} is loaded (loaded: {known})")
    old = definitions.get(from_process)
    counts = dict(
        session.execute(
            select(OrderItem.state, func.count())
            .where(OrderItem.process == from_process)
            .group_by(OrderItem.state)
        ).all()
    )
    if not counts:
        raise MigrationError(f"no items on process {from_process!r}")
    problems = []
    for old_state, new_state in sorted(state_map.items()):
        if new_state not in target.states:
            problems.append(
                f"target state {new_state!r} (for {old_state!r}) is not a state of {to_process}"
            )
    plan = MigrationPlan(from_process, to_process)
    for state, n in sorted(counts.items()):
        if state in state_map:
            plan.moves[(state, state_map[state])] += int(n)
        elif old is not None and state in old.states and old.is_final(state):
            plan.left[state] += int(n)
        else:
            problems.append(
                f"{n} running item(s) in state {state!r} of {from_process} "
                "have no target in the map"
            )
    if problems:
        raise MigrationError("migration refused, nothing changed: " + "; ".join(problems))
    moving = sorted(state_map)
    plan.item_ids = list(
        session.scalars(
            select(OrderItem.id)
            .where(OrderItem.process == from_process, OrderItem.state.in_(moving))
            .order_by(OrderItem.id)
        )
    )
    leased = list(
        session.scalars(
            select(Order.order_ref)
            .join(OrderItem, OrderItem.order_id == Order.id)
            .where(
                OrderItem.process == from_process,
                OrderItem.state.in_(moving),
                Order.claimed_by.is_not(None),
                Order.claim_expires_at > now,
            )
            .distinct()
        )
    )
    waiting = list(
        session.scalars(
            select(Order.order_ref)
            .join(OrderItem, OrderItem.order_id == Order.id)
            .where(
                OrderItem.process == from_process,
                OrderItem.state.in_(moving),
                OrderItem.intent_id.is_not(None),
            )
            .distinct()
        )
    )
    if waiting:
        # Their intent names the state and process it was sent from; it settles them there.
        raise MigrationError(
            "migration refused, nothing changed: order(s) with a gateway call whose outcome is "
            "open: " + ", ".join(sorted(waiting)[:10])
            + " (see: ratepay-oms intents list)"
        )
    if leased:
        raise MigrationError(
            "migration refused, nothing changed: order(s) leased by a running worker: "
            + ", ".join(sorted(leased)[:10])
            + " (wait for the tick to finish, or see: ratepay-oms locks list)"
        )
    plan.orders = (
        int(
            session.scalar(
                select(func.count(func.distinct(OrderItem.order_id))).where(
                    OrderItem.id.in_(plan.item_ids)
                )
            )
            or 0
        )
        if plan.item_ids
        else 0
    )
    return plan


def migrate(
    source: Any,
    definitions: Mapping[str, ProcessDefinition],
    from_process: str,
    to_process: str,
    state_map: Mapping[str, str],
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> MigrationPlan:
    """Plan and (unless ``dry_run``) carry out the migration in one transaction."""
    now = now or utc_now()
    state_map = check_state_map(dict(state_map))
    with session_of(source) as session:
        if dry_run:
            return _plan(session, definitions, from_process, to_process, state_map, now)
        with session.begin():
            plan = _plan(session, definitions, from_process, to_process, state_map, now)
            _apply(session, definitions[to_process], plan, state_map, now)
    log.warning(
        "migrated %d item(s) of %d order(s) from %s to %s",
        plan.items,
        plan.orders,
        from_process,
        to_process,
    )
    return plan


def _apply(
    session: Any,
    target: ProcessDefinition,
    plan: MigrationPlan,
    state_map: Mapping[str, str],
    now: datetime,
) -> None:
    hostname = socket.gethostname()
    argv = " ".join(sys.argv)
    for start in range(0, len(plan.item_ids), BATCH):
        ids = plan.item_ids[start : start + BATCH]
        rows = session.execute(
            select(OrderItem.id, OrderItem.order_id, OrderItem.state).where(OrderItem.id.in_(ids))
        ).all()
        by_move: dict[tuple[str, str], list[int]] = {}
        for item_id, _order_id, state in rows:
            by_move.setdefault((state, state_map[state]), []).append(item_id)
        session.execute(delete(EventTimeout).where(EventTimeout.item_id.in_(ids)))
        for (_old_state, new_state), move_ids in by_move.items():
            session.execute(
                update(OrderItem)
                .where(OrderItem.id.in_(move_ids))
                .values(
                    process=target.name,
                    state=new_state,
                    state_entered_at=now,
                    retry_event=None,
                    retry_at=None,
                    attempts=0,
                )
                .execution_options(synchronize_session=False)
            )
            timeouts = [
                {"item_id": i, "state": new_state, "event": e.name, "due_at": now + e.timeout}
                for i in move_ids
                for e in target.timeout_events(new_state)
                if e.timeout is not None
            ]
            if timeouts:
                session.execute(insert(EventTimeout), timeouts)
        order_of = {item_id: order_id for item_id, order_id, _ in rows}
        session.execute(
            insert(StateHistory),
            [
                {
                    "item_id": i,
                    "order_id": order_of[i],
                    "from_state": state,
                    "to_state": state_map[state],
                    "event": MIGRATION_EVENT,
                    "created_at": now,
                }
                for i, _o, state in rows
            ],
        )
        session.execute(
            insert(TransitionLog),
            [
                {
                    "item_id": i,
                    "order_id": order_of[i],
                    "process": target.name,
                    "event": MIGRATION_EVENT,
                    "source_state": state,
                    "target_state": state_map[state],
                    "command": None,
                    "condition": None,
                    "is_error": False,
                    "error_message": None,
                    "hostname": hostname,
                    "argv": argv,
                    "created_at": now,
                }
                for i, _o, state in rows
            ],
        )
    # Orders whose items all left FROM now belong to TO.
    remaining = select(OrderItem.order_id).where(OrderItem.process == plan.source)
    session.execute(
        update(Order)
        .where(Order.process == plan.source, Order.id.not_in(remaining))
        .values(process=target.name)
        .execution_options(synchronize_session=False)
    )


def plan_as_text(plan: MigrationPlan) -> list[str]:
    lines = [f"{plan.items} item(s) of {plan.orders} order(s): {plan.source} → {plan.target}"]
    for (a, b), n in sorted(plan.moves.items()):
        lines.append(f"  {a} → {b}: {n}")
    for state, n in sorted(plan.left.items()):
        lines.append(f"  {state} (final, not mapped): {n} stay on {plan.source}")
    return lines


def dump_json(plan: MigrationPlan) -> str:
    return json.dumps(plan.to_json(), indent=2)
