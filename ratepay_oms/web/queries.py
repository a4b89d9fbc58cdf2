"""The reads behind the console's pages, shaped for paging at a million items.

The orders list pages by key (``id < last id seen``), never by offset, and counts nothing it
does not show: one page costs an index range scan of ``PAGE_SIZE + 1`` orders (plus an index
probe per order for a state filter) and one grouped read of those orders' items, however many
orders there are. The indexes it relies on are declared in ``ratepay_oms.persistence.web``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ratepay_oms.persistence.models import Order, OrderItem, StateHistory

PAGE_SIZE = 50
HISTORY_LIMIT = 300
"""Newest history rows the order page shows (an order of 1,000 items has thousands)."""


@dataclass(frozen=True)
class OrderSearch:
    """What the orders list filters by; empty fields filter nothing."""

    ref: str = ""
    state: str = ""
    process: str = ""
    date_from: date | None = None
    date_to: date | None = None
    """Inclusive: the whole day."""

    def params(self) -> dict[str, str]:
        """The filters as query parameters (for the paging links)."""
        out = {"ref": self.ref, "state": self.state, "process": self.process,
               "from": self.date_from.isoformat() if self.date_from else "",
               "to": self.date_to.isoformat() if self.date_to else ""}
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True)
class OrderRow:
    id: int
    order_ref: str
    process: str
    currency: str
    goods_total: Decimal
    created_at: datetime
    states: dict[str, int] = field(default_factory=dict)

    @property
    def items(self) -> int:
        return sum(self.states.values())


@dataclass(frozen=True)
class OrdersPage:
    rows: list[OrderRow]
    newer: int | None
    """Cursor for the page before (``after=``), ``None`` on the first page."""
    older: int | None
    """Cursor for the page after (``before=``), ``None`` on the last page."""


def _like_prefix(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def search_orders(
    session: Session,
    search: OrderSearch,
    *,
    before: int | None = None,
    after: int | None = None,
    limit: int = PAGE_SIZE,
) -> OrdersPage:
    """One page of orders, newest first. ``before``: ids below it (next page); ``after``:
    ids above it (previous page).

    A state filter is driven from the items' ``(state, order_id)`` index: candidate order ids
    come from it in id order, a chunk at a time, and the other filters apply to those. So a
    rare state reads only its own items, and a common one stops after a page's worth, instead
    of probing order after order for an item in that state.
    """
    stmt = select(
        Order.id, Order.order_ref, Order.process, Order.currency, Order.goods_total,
        Order.created_at,
    )
    if search.ref:
        stmt = stmt.where(Order.order_ref.like(_like_prefix(search.ref), escape="\\"))
    if search.process:
        stmt = stmt.where(Order.process == search.process)
    if search.date_from:
        stmt = stmt.where(Order.created_at >= datetime.combine(search.date_from, time.min))
    if search.date_to:
        stmt = stmt.where(
            Order.created_at < datetime.combine(search.date_to + timedelta(days=1), time.min)
        )
    ascending = after is not None
    cursor = after if ascending else before
    if search.state:
        rows = _by_state(session, stmt, search.state, cursor, ascending, limit + 1)
    else:
        if cursor is not None:
            stmt = stmt.where(Order.id > cursor if ascending else Order.id < cursor)
        order = Order.id.asc() if ascending else Order.id.desc()
        rows = list(session.execute(stmt.order_by(order).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    if ascending:
        rows.reverse()
        newer = rows[0].id if rows and more else None
        older = rows[-1].id if rows else None
    else:
        newer = rows[0].id if rows and before is not None else None
        older = rows[-1].id if rows and more else None
    states: dict[int, dict[str, int]] = {r.id: {} for r in rows}
    if rows:
        counts = session.execute(
            select(OrderItem.order_id, OrderItem.state, func.count())
            .where(OrderItem.order_id.in_(list(states)))
            .group_by(OrderItem.order_id, OrderItem.state)
        )
        for order_id, state, n in counts:
            states[order_id][state] = int(n)
    return OrdersPage(
        [
            OrderRow(r.id, r.order_ref, r.process, r.currency, r.goods_total, r.created_at,
                     dict(sorted(states[r.id].items())))
            for r in rows
        ],
        newer,
        older,
    )


STATE_CHUNK_MAX = 5000


def _by_state(
    session: Session, stmt: Any, state: str, cursor: int | None, ascending: bool, wanted: int
) -> list[Any]:
    """Rows of ``stmt`` (orders) having an item in ``state``, in id order from ``cursor``."""
    rows: list[Any] = []
    chunk = wanted
    while len(rows) < wanted:
        candidates = select(OrderItem.order_id).where(OrderItem.state == state).distinct()
        if cursor is not None:
            candidates = candidates.where(
                OrderItem.order_id > cursor if ascending else OrderItem.order_id < cursor
            )
        candidates = candidates.order_by(
            OrderItem.order_id.asc() if ascending else OrderItem.order_id.desc()
        ).limit(chunk)
        ids = list(session.scalars(candidates))
        if not ids:
            break
        order = Order.id.asc() if ascending else Order.id.desc()
        rows.extend(session.execute(stmt.where(Order.id.in_(ids)).order_by(order)))
        if len(ids) < chunk:
            break
        cursor = ids[-1]
        chunk = min(chunk * 4, STATE_CHUNK_MAX)
    return rows[:wanted]


@dataclass(frozen=True)
class HistoryRow:
    at: datetime
    item_id: int | None
    sku: str | None
    from_state: str | None
    to_state: str | None
    event: str | None
    user: str | None = None
    """Set for an operator's action in the console (then ``text`` says what came of it)."""
    text: str | None = None
    outcome: str | None = None


def order_id_of(session: Session, ref: str) -> int | None:
    return session.scalar(select(Order.id).where(Order.order_ref == ref))


def history(
    session: Session, order_id: int, limit: int = HISTORY_LIMIT
) -> tuple[list[HistoryRow], int]:
    """The newest ``limit`` state changes of the order (oldest first) and how many there are."""
    total = int(
        session.scalar(
            select(func.count()).select_from(StateHistory).where(StateHistory.order_id == order_id)
        )
        or 0
    )
    rows = session.execute(
        select(StateHistory.created_at, StateHistory.item_id, OrderItem.sku,
               StateHistory.from_state, StateHistory.to_state, StateHistory.event)
        .join(OrderItem, OrderItem.id == StateHistory.item_id)
        .where(StateHistory.order_id == order_id)
        .order_by(StateHistory.id.desc())
        .limit(limit)
    )
    return [HistoryRow(*r) for r in reversed(list(rows))], total


@dataclass(frozen=True)
class ItemGroup:
    """Items of one SKU in one state: a line of the summary of a big order."""

    sku: str
    name: str
    state: str
    item_ids: tuple[int, ...]
    events: tuple[str, ...]
    """Manual events this state accepts."""
    waiting: int = 0
    """Items of the group held by an open gateway-call intent (no event fires for them)."""

    @property
    def count(self) -> int:
        return len(self.item_ids)

    @property
    def key(self) -> str:
        return f"{self.sku}\x1f{self.state}"


def group_items(items: Sequence[Mapping[str, Any]]) -> list[ItemGroup]:
    """The order's items by SKU and state (first appearance order), for orders too big to
    list item by item."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for item in items:
        groups.setdefault((str(item["sku"]), str(item["state"])), []).append(item)
    return [
        ItemGroup(
            sku, str(members[0]["name"]), state,
            tuple(int(m["id"]) for m in members),
            tuple(members[0].get("manual_events") or ()),
            sum(1 for m in members if m.get("intent_id")),
        )
        for (sku, state), members in groups.items()
    ]


def accepted_events(items: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Manual event → how many items (not held by an intent) accept it now."""
    counts: Counter[str] = Counter()
    for item in items:
        if item.get("intent_id"):
            continue
        for event in item.get("manual_events") or ():
            counts[event] += 1
    return dict(counts)
