"""Exactly-once external calls: intent before the call, settle with the move, reconcile after.

A RatePAY booking (delivery, cancellation, return, payment request, confirmation) cannot be
taken back by rolling back a database transaction. So a group whose command is an
``ExternalCommand`` runs in three steps, each order under its lease:

1. **intent** — in a transaction of its own: re-read the items, let the command ``prepare`` the
   call, write an ``oms_intent`` row (what will be sent: operation, positions, amounts) and mark
   the items as waiting on it; commit. From now on the call is known to the database.
2. **call** — ``send`` outside any transaction.
3. **settle** — in one transaction: mark the intent settled (a compare-and-set on its status,
   so two workers can never both apply it), let the command ``apply`` the answer, move the
   items and run the on-enter cascade (which may defer further external groups).

If step 3 never happens (the worker was killed, the answer was lost, the gateway timed out
after booking) the intent stays ``pending`` and its items stay blocked: no retry, timeout or
event fires for them. The tick's first step finds such intents (on the wall clock, like
leases, whatever ``--now`` says) once nobody holds their order, and asks the command to
``reconcile`` them — for RatePAY, through the transaction status lookup — and settles them
from that answer: booked → applied as if answered; not booked → the items are retried at once
(sending is safe now). When nobody can tell (no status source), the intent becomes
``unknown`` and waits for a person (``ratepay-oms intents resolve``). A request that certainly
never left (connection refused) is settled ``not_sent`` at once and
the items get an ordinary retry.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ratepay_oms.engine.claims import Claims
from ratepay_oms.engine.clock import retry_delay, wall_now
from ratepay_oms.engine.compiler import CompiledProcess
from ratepay_oms.engine.errors import OrderLockedError
from ratepay_oms.engine.persist import Origin, chunked
from ratepay_oms.engine.plugins import PluginRegistry, PreparedCall, Reconciled
from ratepay_oms.engine.runner import MAX_EVENT_REPEATS, Deferred, Group, Runner, RunStats
from ratepay_oms.engine.runner import describe_error as _describe
from ratepay_oms.errors import OmsError
from ratepay_oms.persistence.models import (
    INTENT_OPEN_STATUSES,
    INTENT_PENDING,
    INTENT_SETTLED,
    INTENT_UNKNOWN,
    Intent,
    Order,
    OrderItem,
)

log = logging.getLogger(__name__)

RECONCILE_BATCH = 200

# How an intent was settled (``Intent.resolution``).
ANSWERED = "answered"
NOT_SENT = "not_sent"
RECONCILED_BOOKED = "reconciled_booked"
RECONCILED_NOT_BOOKED = "reconciled_not_booked"
RESOLVED_BOOKED = "resolved_booked"
RESOLVED_NOT_BOOKED = "resolved_not_booked"


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


class _Lost(Exception):
    """Someone else settled the intent first: roll back what we did."""


class ExternalCalls:
    """Runs deferred external groups and reconciles open intents (see the module docstring)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        compiled: Mapping[str, CompiledProcess],
        registry: PluginRegistry,
        services: Mapping[str, Any],
        origin: Origin,
        claims: Claims,
        now: datetime,
        stats: RunStats,
    ) -> None:
        self.sessions = sessions
        self.compiled = compiled
        self.registry = registry
        self.services = dict(services)
        self.origin = origin
        self.claims = claims
        self.now = now
        self.stats = stats

    def _runner(self, session: Session) -> Runner:
        return Runner(
            session, self.compiled, self.registry, self.services, self.now, self.origin,
            self.stats,
        )

    # -- deferred groups ---------------------------------------------------------------------

    def run(self, deferred: Sequence[Deferred]) -> None:
        """Run each deferred group (and whatever its cascade defers) to the end."""
        queue = list(deferred)
        seen: Counter[tuple[int, str, str | None]] = Counter()
        while queue:
            d = queue.pop(0)
            key = (d.order_id, d.state, d.event)
            seen[key] += 1
            if seen[key] > MAX_EVENT_REPEATS:
                self._guarded(d)
                continue
            queue.extend(self._guard_db(f"{d.command} for order #{d.order_id}", self._one, d))

    def _guard_db(
        self, what: str, step: Callable[[Deferred], list[Deferred]], d: Deferred
    ) -> list[Deferred]:
        """A database failure loses nothing here: the intent (if written) stays open."""
        try:
            return step(d)
        except SQLAlchemyError as exc:
            orig = getattr(exc, "orig", None) or exc
            message = f"database error in {what}: {type(orig).__name__}: {str(orig)[:300]}"
            log.error("%s", message)
            self.stats.errors += 1
            self.stats.error_messages.append(message)
            return []

    def _load(
        self, session: Session, d: Deferred
    ) -> tuple[Order, list[OrderItem]] | None:
        order = session.get(Order, d.order_id)
        if order is None:
            return None
        items: list[OrderItem] = []
        for part in chunked(list(d.item_ids)):
            items.extend(
                session.scalars(
                    select(OrderItem).where(
                        OrderItem.id.in_(part),
                        OrderItem.process == d.process,
                        OrderItem.state == d.state,
                        OrderItem.intent_id.is_(None),
                    )
                )
            )
        items.sort(key=lambda i: i.id)
        return order, items

    def _one(self, d: Deferred) -> list[Deferred]:
        if not self.claims.claim([d.order_id]):
            message = (
                f"order #{d.order_id}: {d.command} not run, another worker holds the order; "
                "the tick picks it up again"
            )
            log.warning("%s", message)
            self.stats.error_messages.append(message)
            return []
        command = self.registry.command(d.command)
        # 1. the intent
        with self.sessions() as session, session.begin():
            loaded = self._load(session, d)
            if loaded is None or not loaded[1]:
                return []  # moved on meanwhile: nothing to do
            order, items = loaded
            group = Group(order, d.process, d.state, d.event, items)
            runner = self._runner(session)
            ctx = runner.context(group)
            try:
                with session.begin_nested():
                    call: PreparedCall | None = command.prepare(ctx, order, items)  # type: ignore[union-attr]
            except Exception as exc:
                self.stats.commands_run += 1
                runner.fail(group, items, d.command, exc)
                runner.finish()
                return []
            if call is None:
                # Decided without a call (the command recorded why): go on as answered.
                runner.resume(group, d.command, None, record_stays=d.record_stays)
                self.stats.commands_run += 1
                return runner.deferred
            intent = Intent(
                order_id=order.id,
                process=d.process,
                state=d.state,
                event=d.event,
                command=d.command,
                item_ids=json.dumps([i.id for i in items]),
                summary=json.dumps(call.summary, default=str, sort_keys=True),
                status=INTENT_PENDING,
                worker=self.claims.worker_id,
                attempts=0,
                created_at=self.now,
                # Not before our lease would have run out: until then the call may still be in
                # flight, and asking too early could read "not booked" and send it twice.
                reconcile_at=wall_now() + self.claims.lease,
            )
            session.add(intent)
            session.flush()
            intent_id = intent.id
            _set_intent(session, items, intent_id)
        # 2. the call
        try:
            answer = command.send(self.services, call)  # type: ignore[union-attr]
        except Exception as exc:
            return self._call_failed(intent_id, d, exc)
        # 3. settle
        return self._settle(intent_id, answer, ANSWERED, record_stays=d.record_stays)

    def _call_failed(self, intent_id: int, d: Deferred, exc: Exception) -> list[Deferred]:
        message = _describe(exc)
        sent = getattr(exc, "sent", True) is not False
        if not sent:
            return self._settle(
                intent_id, Reconciled(False, detail=message), NOT_SENT, count_command=True
            )
        with self.sessions() as session, session.begin():
            intent = session.get_one(Intent, intent_id)
            intent.last_error = message
            intent.reconcile_at = wall_now()
            order = session.get_one(Order, intent.order_id)
            items = _blocked_items(session, intent_id)
            runner = self._runner(session)
            runner.note_error(
                Group(order, d.process, d.state, d.event, items),
                items,
                d.command,
                f"{message} (may have been booked: intent {intent_id} is reconciled by the "
                "next tick, not re-sent)",
            )
            runner.finish()
        self.stats.commands_run += 1
        log.warning("intent %s left open after: %s", intent_id, message)
        return []

    def _settle(
        self,
        intent_id: int,
        answer: Any,
        resolution: str,
        *,
        record_stays: bool = False,
        note: str | None = None,
        count_command: bool = False,
    ) -> list[Deferred]:
        """Settle the intent, apply ``answer`` (or retry when not booked), move the items."""
        booked = not isinstance(answer, Reconciled) or answer.booked
        try:
            with self.sessions() as session, session.begin():
                won = session.execute(
                    update(Intent)
                    .where(Intent.id == intent_id, Intent.status.in_(INTENT_OPEN_STATUSES))
                    .values(
                        status=INTENT_SETTLED,
                        resolution=resolution,
                        settled_at=self.now,
                        note=note,
                    )
                    .execution_options(synchronize_session=False)
                )
                if won.rowcount != 1:  # type: ignore[attr-defined]
                    raise _Lost
                intent = session.get_one(Intent, intent_id)
                summary = json.loads(intent.summary)
                order = session.get_one(Order, intent.order_id)
                items = _blocked_items(session, intent_id)
                _set_intent(session, items, None)
                group = Group(order, intent.process, intent.state, intent.event, items)
                runner = self._runner(session)
                if not items:
                    return []
                if booked:
                    command = self.registry.command(intent.command)

                    def apply(ctx: Any) -> None:
                        command.apply(ctx, order, items, summary, answer)  # type: ignore[union-attr]

                    runner.resume(group, intent.command, apply, record_stays=record_stays)
                else:
                    detail = answer.detail if isinstance(answer, Reconciled) else ""
                    if count_command:
                        self.stats.commands_run += 1
                    runner.fail(
                        group,
                        items,
                        intent.command,
                        f"not booked at the gateway ({resolution}): {detail}".rstrip(": "),
                        retry_in=timedelta(0) if resolution != NOT_SENT else None,
                    )
                    runner.finish()
                return runner.deferred
        except _Lost:
            log.warning("intent %s was settled by someone else; nothing applied", intent_id)
            return []

    def _guarded(self, d: Deferred) -> None:
        with self.sessions() as session, session.begin():
            loaded = self._load(session, d)
            if loaded is None or not loaded[1]:
                return
            order, items = loaded
            runner = self._runner(session)
            runner.fail(
                Group(order, d.process, d.state, d.event, items),
                items,
                None,
                f"loop guard: {d.event or '(event-less)'} fired more than {MAX_EVENT_REPEATS} "
                f"times from {d.state} in one run; check the process for a cycle",
            )
            runner.finish()

    # -- reconciliation ------------------------------------------------------------------------

    def reconcile_open(self) -> int:
        """Settle pending intents nobody works on; returns how many were looked at."""
        looked = 0
        after = 0
        while True:
            with self.sessions() as session:
                rows = session.execute(
                    select(Intent.id, Intent.order_id)
                    .where(
                        Intent.status == INTENT_PENDING,
                        Intent.reconcile_at <= wall_now(),
                        Intent.id > after,
                    )
                    .order_by(Intent.id)
                    .limit(RECONCILE_BATCH)
                ).all()
            if not rows:
                return looked
            after = rows[-1][0]
            for intent_id, order_id in rows:
                if not self.claims.claim([order_id]):
                    continue  # its worker is still at it, or another worker reconciles it
                try:
                    looked += 1
                    deferred = self._guard_reconcile(intent_id)
                    self.run(deferred)
                finally:
                    try:
                        self.claims.release([order_id])
                    except SQLAlchemyError as exc:
                        log.warning("could not release order #%s (lease expires): %s",
                                    order_id, exc)

    def _guard_reconcile(self, intent_id: int) -> list[Deferred]:
        try:
            return self._reconcile_one(intent_id)
        except SQLAlchemyError as exc:
            message = f"database error reconciling intent {intent_id}: {exc.__class__.__name__}"
            log.error("%s", message)
            self.stats.errors += 1
            self.stats.error_messages.append(message)
            return []

    def _reconcile_one(self, intent_id: int) -> list[Deferred]:
        with self.sessions() as session:
            intent = session.get(Intent, intent_id)
            if intent is None or intent.status != INTENT_PENDING:
                return []
            summary = json.loads(intent.summary)
            command_name = intent.command
        command = self.registry.command(command_name)
        try:
            verdict: Reconciled | None = command.reconcile(self.services, summary)  # type: ignore[union-attr]
        except Exception as exc:
            message = _describe(exc)
            with self.sessions() as session, session.begin():
                intent = session.get_one(Intent, intent_id)
                intent.attempts = (intent.attempts or 0) + 1
                intent.last_error = f"status lookup failed: {message}"
                intent.reconcile_at = wall_now() + retry_delay(intent.attempts)
            self.stats.errors += 1
            self.stats.error_messages.append(f"intent {intent_id}: status lookup failed: {message}")
            return []
        if verdict is None:
            with self.sessions() as session, session.begin():
                session.execute(
                    update(Intent)
                    .where(Intent.id == intent_id, Intent.status == INTENT_PENDING)
                    .values(
                        status=INTENT_UNKNOWN,
                        last_error="no transaction status source to ask (set "
                        "RATEPAY_STATUS_API_URL); a person must check and resolve it",
                    )
                    .execution_options(synchronize_session=False)
                )
            message = (
                f"intent {intent_id} ({command_name}): outcome unknown, waiting for a person "
                f"(ratepay-oms intents resolve {intent_id} --booked|--not-booked)"
            )
            log.warning("%s", message)
            self.stats.error_messages.append(message)
            return []
        resolution = RECONCILED_BOOKED if verdict.booked else RECONCILED_NOT_BOOKED
        log.info("intent %s reconciled: %s %s", intent_id, resolution, verdict.detail)
        return self._settle(intent_id, verdict, resolution, note=verdict.detail or None)

    def resolve(self, intent_id: int, *, booked: bool, note: str) -> None:
        """A person's verdict on an open intent (after checking at the gateway)."""
        with self.sessions() as session:
            intent = session.get(Intent, intent_id)
            if intent is None:
                raise IntentError(f"no intent {intent_id}")
            if intent.status not in INTENT_OPEN_STATUSES:
                raise IntentError(
                    f"intent {intent_id} is already settled ({intent.resolution}); nothing to do"
                )
            order_id = intent.order_id
        if not self.claims.claim([order_id]):
            holder, until = self.claims.holder(order_id)
            raise OrderLockedError(
                f"intent {intent_id}: its order is being worked on by {holder} (lease until "
                f"{until} UTC); try again shortly"
            )
        try:
            verdict = Reconciled(booked, None, f"resolved by a person: {note}".rstrip(": "))
            resolution = RESOLVED_BOOKED if booked else RESOLVED_NOT_BOOKED
            deferred = self._settle(intent_id, verdict, resolution, note=verdict.detail)
            self.run(deferred)
        finally:
            self.claims.release([order_id])


def _set_intent(session: Session, items: Sequence[OrderItem], intent_id: int | None) -> None:
    """Mark ``items`` as waiting on ``intent_id`` (``None``: no longer waiting)."""
    from sqlalchemy.orm.attributes import set_committed_value

    for part in chunked([i.id for i in items]):
        session.execute(
            update(OrderItem)
            .where(OrderItem.id.in_(part))
            .values(intent_id=intent_id)
            .execution_options(synchronize_session=False)
        )
    for item in items:
        set_committed_value(item, "intent_id", intent_id)


def _blocked_items(session: Session, intent_id: int) -> list[OrderItem]:
    return list(
        session.scalars(
            select(OrderItem).where(OrderItem.intent_id == intent_id).order_by(OrderItem.id)
        )
    )
