"""One manual event for many orders at once: ``Engine.trigger_many`` (bulk events).

``Engine.trigger`` per order costs a transaction per order; for a file of a thousand
shipments that is most of the time. Here the orders of a chunk are decided in one transaction
of the drive loop (``Drive.transact``: lock the orders nobody holds, pick each request's items
as ``trigger`` would, fire them all through one ``Runner``), and the gateway calls they planned
run afterwards on a ``CallPool`` (up to K orders at once, one call per order at a time), exactly
as a tick batch does. Nothing about an order's semantics changes: the same item choice, the
same commands, conditions, cascade, intents and leases.

Each request gets its own result: refused (why, nothing written for it), busy (another worker
or transaction has the order right now: the caller may retry it with ``trigger``), or what
moved, stayed and failed for its items. A request for an order that already has one in the
same chunk goes into a later chunk, so one order's requests run in the given order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from ratepay_oms.engine.drive import CallPool, Drive
from ratepay_oms.engine.errors import ManualEventError
from ratepay_oms.engine.runner import LoopGuard, Runner, group_items
from ratepay_oms.persistence.models import Order, OrderItem

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

CHUNK = 100
"""Orders decided in one transaction: big enough that a commit is shared by many orders, small
enough that a transaction stays short and a chunk's calls start soon."""


@dataclass(frozen=True)
class EventRequest:
    """Fire the event for ``item_ids`` of ``order_ref`` (``None``: every item accepting it)."""

    order_ref: str
    item_ids: tuple[int, ...] | None = None


@dataclass
class EventOutcome:
    """What became of one request."""

    refused: str | None = None
    busy: bool = False
    """Another worker or transaction had the order: nothing was done, try again."""
    items: list[int] = field(default_factory=list)
    moved: list[tuple[int, str, str]] = field(default_factory=list)
    stayed: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    held: list[tuple[int, str]] = field(default_factory=list)
    """(item id, why): accepted, but waiting for another booking of the order in doubt."""


def _waves(requests: Sequence[EventRequest]) -> list[list[int]]:
    """Request indexes in chunks with each order at most once per chunk, in the given order."""
    waves: list[list[int]] = []
    seen: dict[str, int] = {}
    for index, request in enumerate(requests):
        wave = seen.get(request.order_ref, -1) + 1
        seen[request.order_ref] = wave
        while len(waves) <= wave:
            waves.append([])
        waves[wave].append(index)
    return [wave[start : start + CHUNK] for wave in waves for start in range(0, len(wave), CHUNK)]


def fire_many(
    drive: Drive, event: str, requests: Sequence[EventRequest], concurrency: int
) -> list[EventOutcome]:
    """Fire ``event`` for every request (see the module docstring)."""
    from ratepay_oms.engine.engine import _select_for_event

    outcomes = [EventOutcome() for _ in requests]
    busy: set[str] = set()  # an order busy once stays busy: its later requests keep their turn
    for chunk in _waves(requests):
        owner: dict[int, int] = {}  # item id -> request index, for this chunk

        def work(
            runner: Runner, chunk: list[int] = chunk, owner: dict[int, int] = owner
        ) -> set[str]:
            """The chunk's transaction; the orders found busy. Run again from scratch when a
            plan fails (``Drive.transact``), so it starts from fresh outcomes and leaves
            ``busy`` to the caller, after it committed."""
            owner.clear()
            for index in chunk:
                outcomes[index] = EventOutcome()
            now_busy: set[str] = set()
            session = runner.session
            refs = sorted({requests[i].order_ref for i in chunk})
            orders = {
                o.order_ref: o
                for o in session.scalars(select(Order).where(Order.order_ref.in_(refs)))
            }
            free = set(runner.engine.claims.lock(session, [o.id for o in orders.values()]))
            items: dict[int, list[OrderItem]] = {}
            for item in session.scalars(
                select(OrderItem)
                .where(OrderItem.order_id.in_(sorted(free)))
                .order_by(OrderItem.id)
            ):
                items.setdefault(item.order_id, []).append(item)
            pairs: list[tuple[OrderItem, str | None]] = []
            chosen_orders: dict[int, Order] = {}
            for index in chunk:
                request, outcome = requests[index], outcomes[index]
                order = orders.get(request.order_ref)
                if order is None:
                    outcome.refused = f"no order {request.order_ref!r}"
                    continue
                if order.id not in free or request.order_ref in busy:
                    outcome.busy = True
                    now_busy.add(request.order_ref)
                    continue
                definition = runner.engine.definitions.get(order.process)
                if definition is None:
                    outcome.refused = f"process {order.process!r} is not loaded"
                    continue
                try:
                    chosen = _select_for_event(
                        definition, request.order_ref, event, items.get(order.id, []),
                        request.item_ids,
                    )
                except ManualEventError as exc:
                    outcome.refused = str(exc)
                    continue
                outcome.items = [i.id for i in chosen]
                owner.update((i.id, index) for i in chosen)
                pairs += [(i, event) for i in chosen]
                chosen_orders[order.id] = order
            runner.run(group_items(pairs, chosen_orders), record_stays=True)
            return now_busy

        before = _marks(drive)
        try:
            now_busy, calls = drive.transact(work, LoopGuard())
        except SQLAlchemyError as exc:
            first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
            for index in chunk:
                outcomes[index] = EventOutcome(refused=f"database error: {first}")
            log.error("bulk %s: a chunk of %d orders failed: %s", event, len(chunk), first)
            continue
        busy.update(now_busy)
        if calls:
            pool = CallPool(drive, concurrency)
            try:
                pool.submit(calls)
            finally:
                pool.close()
        _attribute(drive, before, owner, outcomes)
    return outcomes


def _marks(drive: Drive) -> tuple[int, int, int, int]:
    stats = drive.stats
    return len(stats.moves), len(stats.stayed), len(stats.failed), len(stats.held)


def _attribute(
    drive: Drive, before: tuple[int, int, int, int], owner: dict[int, int],
    outcomes: list[EventOutcome],
) -> None:
    """Hand this chunk's moves, stays and failures to the requests whose items they are."""
    moves, stays, fails, holds = before
    stats = drive.stats
    for move in stats.moves[moves:]:
        if move[0] in owner:
            outcomes[owner[move[0]]].moved.append(move)
    for item_id in stats.stayed[stays:]:
        if item_id in owner:
            outcomes[owner[item_id]].stayed.append(item_id)
    for item_id, why in stats.held[holds:]:
        if item_id in owner:
            outcomes[owner[item_id]].held.append((item_id, why))
    for item_id, message in stats.failed[fails:]:
        if item_id in owner:
            errors = outcomes[owner[item_id]].errors
            if message not in errors:
                errors.append(message)
