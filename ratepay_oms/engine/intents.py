"""Exactly-once external calls: intent before the call, settle with the move, reconcile after.

A RatePAY booking (delivery, cancellation, return, payment request, confirmation) cannot be
taken back by rolling back a database transaction. So a group whose command is an
``ExternalCommand`` goes through the drive loop (``ratepay_oms.engine.drive``) in three steps,
its order under a lease:

1. **intent** — in the transaction that decides the moves: the command ``plan``s the call from
   the database alone; the runner writes an ``oms_intent`` row (what will be sent: operation,
   positions, amounts) and marks the items as waiting on it; commit. From now on the call is
   known to the database.
2. **call** — ``send`` outside any transaction (every network request of the command, e.g.
   PAYMENT_INIT, CALCULATION_REQUEST and PAYMENT_REQUEST; what a later step would need to
   reconcile, like the transaction id, is stored on the intent by ``CallContext.remember``
   before the booking request leaves).
3. **settle** — in one transaction: mark the intent settled (a compare-and-set on its status,
   so two workers can never both apply it), let the command ``apply`` the answer, move the
   items and run the on-enter cascade (which may plan further calls).

If step 3 never happens (the worker was killed, the answer was lost, the gateway timed out
after booking) the intent stays ``pending`` and its items stay blocked: no retry, timeout or
event fires for them. The tick's first step finds such intents (on the wall clock, like
leases, whatever ``--now`` says) once nobody holds their order, and asks the command to
``reconcile`` them — for RatePAY, through the transaction status lookup — and settles them
from that answer: booked → applied as if answered; not booked → the items are retried at once
(sending is safe now). When nobody can tell (no status source), the intent becomes
``unknown`` and waits for a person (``ratepay-oms intents resolve``). A request that certainly
never left (``CallNotSentError``) is settled ``not_sent`` at once and the items get an
ordinary retry.

This module holds what the console reads about intents; the writing is the runner's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.orm import Session

from ratepay_oms.engine.clock import wall_now
from ratepay_oms.errors import OmsError
from ratepay_oms.persistence.models import (
    INTENT_OPEN_STATUSES,
    INTENT_PENDING,
    INTENT_UNKNOWN,
    Intent,
    Order,
)

log = logging.getLogger(__name__)

RECONCILE_BATCH = 200


class IntentError(OmsError):
    """An intent cannot be resolved as asked (unknown id, already settled, ...)."""


@dataclass(frozen=True)
class IntentView:
    """One intent as ``intents list`` and ``order show`` present it."""

    id: int
    order_ref: str
    process: str
    state: str
    event: str | None
    command: str
    item_ids: tuple[int, ...]
    summary: dict[str, Any]
    status: str
    resolution: str | None
    worker: str | None
    attempts: int
    last_error: str | None
    note: str | None
    created_at: datetime
    reconcile_at: datetime | None
    settled_at: datetime | None

    @property
    def open(self) -> bool:
        return self.status in INTENT_OPEN_STATUSES

    def explain(self) -> str:
        """One sentence for an operator: what was sent and what is awaited."""
        what = self.summary.get("describe") or self.command
        items = ", ".join(str(i) for i in self.item_ids)
        if self.status == INTENT_UNKNOWN:
            return (
                f"{what} for items [{items}] was sent at {self.created_at:%Y-%m-%d %H:%M:%S} UTC"
                " and its outcome is unknown (no status lookup answered); check at RatePAY, "
                f"then run: ratepay-oms intents resolve {self.id} --booked | --not-booked"
            )
        if self.status == INTENT_PENDING:
            return (
                f"{what} for items [{items}] is in flight or its answer was lost "
                f"(since {self.created_at:%Y-%m-%d %H:%M:%S} UTC); the tick asks the gateway "
                "what it booked"
                + (f" (last try: {self.last_error})" if self.last_error else "")
            )
        return f"{what} for items [{items}]: {self.resolution}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "order_ref": self.order_ref,
            "process": self.process,
            "state": self.state,
            "event": self.event,
            "command": self.command,
            "item_ids": list(self.item_ids),
            "summary": self.summary,
            "status": self.status,
            "resolution": self.resolution,
            "worker": self.worker,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "note": self.note,
            "created_at": self.created_at.isoformat(),
            "reconcile_at": self.reconcile_at.isoformat() if self.reconcile_at else None,
            "settled_at": self.settled_at.isoformat() if self.settled_at else None,
            "explanation": self.explain(),
        }

    @classmethod
    def of(cls, intent: Intent, order_ref: str) -> IntentView:
        return cls(
            id=intent.id,
            order_ref=order_ref,
            process=intent.process,
            state=intent.state,
            event=intent.event,
            command=intent.command,
            item_ids=tuple(json.loads(intent.item_ids)),
            summary=json.loads(intent.summary),
            status=intent.status,
            resolution=intent.resolution,
            worker=intent.worker,
            attempts=intent.attempts,
            last_error=intent.last_error,
            note=intent.note,
            created_at=intent.created_at,
            reconcile_at=intent.reconcile_at,
            settled_at=intent.settled_at,
        )


def list_intents(
    session: Session, *, order_id: int | None = None, open_only: bool = True
) -> list[IntentView]:
    stmt = select(Intent, Order.order_ref).join(Order, Order.id == Intent.order_id)
    if open_only:
        stmt = stmt.where(Intent.status.in_(INTENT_OPEN_STATUSES))
    if order_id is not None:
        stmt = stmt.where(Intent.order_id == order_id)
    return [IntentView.of(i, ref) for i, ref in session.execute(stmt.order_by(Intent.id))]


def due_for_reconciliation(session: Session, after: int, limit: int) -> list[tuple[int, int]]:
    """(intent id, order id) of pending intents whose reconciliation is due (wall clock), after
    intent id ``after``."""
    rows = session.execute(
        select(Intent.id, Intent.order_id)
        .where(
            Intent.status == INTENT_PENDING,
            Intent.reconcile_at <= wall_now(),
            Intent.id > after,
        )
        .order_by(Intent.id)
        .limit(limit)
    ).all()
    return [(r[0], r[1]) for r in rows]


def reconcile_due(now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
    """Whether any pending intent is due for reconciliation at ``now`` (the tick's probe asks
    this before it walks :func:`due_for_reconciliation`)."""
    return exists(
        select(Intent.id).where(Intent.status == INTENT_PENDING, Intent.reconcile_at <= now)
    )
