"""Bulk events: one manual event for the orders (and items) listed in a CSV file.

Spryker's back office fires an event for many orders at once, and every operator of an order
backend asks for the same with a dry run and a report per row. ``read_event_rows`` reads the
file (``order_ref[,item_id][,event data columns…]``), ``run_bulk_event`` checks every row and,
unless it is a dry run, fires the event through ``Engine.trigger_many`` (many orders to a
transaction, their gateway calls K at a time; rows with event data through ``Engine.trigger``),
and reports each row:
``accepted`` (fired: what moved, what stayed), ``refused`` (with why; nothing written for it),
``failed`` (the command raised: the items stayed, a retry is scheduled), or in a dry run
``would fire`` (which items, from which state, to which candidate targets).

The file: UTF-8 (a BOM is fine). A header row is optional; it is recognised by ``order_ref`` in
its first column and is required when there are more than two columns, because those columns
name the event data (``order_ref,item_id,invoice_id,tracking_id``; an empty ``item_id`` cell
means every item of the order that accepts the event). Blank lines are skipped.

Rows of one order that name items and carry the same data are fired as one event (one
gateway call for the whole shipment, as a person firing ``event ship REF --item …`` would),
after each row was checked on its own so a bad row cannot take good ones with it.
"""

from __future__ import annotations

import csv
import inspect
import io
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from ratepay_oms.console._session import ConsoleError
from ratepay_oms.engine.errors import ManualEventError, OrderLockedError, OrderNotFoundError
from ratepay_oms.errors import OmsError
from ratepay_oms.persistence.models import Order, OrderItem

if TYPE_CHECKING:
    from ratepay_oms.engine.engine import Engine

log = logging.getLogger(__name__)

ACCEPTED = "accepted"
REFUSED = "refused"
FAILED = "failed"
WOULD_FIRE = "would fire"

HEADER_FIRST = "order_ref"
ITEM_COLUMN = "item_id"
DEFAULT_CONCURRENCY = 4
"""Orders fired at once: enough to overlap gateway round trips, few enough for the default
connection pool (5 + 10 overflow) and a 2-core machine."""
LOCK_RETRIES = (0.2, 0.5, 1.0)
"""Seconds to wait before asking again for an order a tick worker holds (its lease is short)."""
READ_CHUNK = 500


class BulkFileError(ConsoleError):
    """The CSV file cannot be used at all (missing, not UTF-8, no rows, bad header)."""


@dataclass(frozen=True)
class EventRow:
    """One data row of the file; ``line`` is its line number in the file (1-based)."""

    line: int
    order_ref: str
    item_id: int | None = None
    data: Mapping[str, str] = field(default_factory=dict)
    problem: str | None = None
    """Why the row is refused before anything is looked up (bad item id, duplicate, …)."""


@dataclass
class RowResult:
    line: int
    order_ref: str
    item_id: int | None
    status: str
    reason: str | None = None
    items: list[int] = field(default_factory=list)
    moved: list[tuple[int, str, str]] = field(default_factory=list)
    stayed: list[int] = field(default_factory=list)
    would: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in (ACCEPTED, WOULD_FIRE)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "line": self.line,
            "order_ref": self.order_ref,
            "item_id": self.item_id,
            "status": self.status,
            "reason": self.reason,
            "items": list(self.items),
        }
        if self.status == WOULD_FIRE:
            out["would"] = self.would
        else:
            out["moved"] = [{"item_id": i, "from": s, "to": t} for i, s, t in self.moved]
            out["stayed"] = list(self.stayed)
        return out


@dataclass
class BulkReport:
    event: str
    dry_run: bool
    rows: list[RowResult]
    duration_s: float = 0.0

    def counts(self) -> dict[str, int]:
        out = {ACCEPTED: 0, WOULD_FIRE: 0, REFUSED: 0, FAILED: 0}
        for row in self.rows:
            out[row.status] += 1
        return out

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "counts": self.counts(),
            "duration_s": round(self.duration_s, 3),
            "rows": [r.to_json() for r in self.rows],
        }


# -- reading the file ---------------------------------------------------------------------------
def read_event_rows(path: str | Path) -> list[EventRow]:
    """The data rows of ``path``; a row that is wrong on its own carries ``problem``.

    Raises ``BulkFileError`` when the file as a whole is unusable.
    """
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise BulkFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BulkFileError(f"{path}: is a directory, not a CSV file") from None
    except UnicodeDecodeError as exc:
        raise BulkFileError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") \
            from None
    return parse_event_rows(text, str(path))


def parse_event_rows(text: str, name: str = "<csv>") -> list[EventRow]:
    """``read_event_rows`` on text already read (see there)."""
    text = text.removeprefix("\ufeff")
    try:
        records = [
            (number, cells)
            for number, cells in _numbered(csv.reader(io.StringIO(text, newline="")))
            if any(c.strip() for c in cells)
        ]
    except csv.Error as exc:
        raise BulkFileError(f"{name}: not valid CSV: {exc}") from None
    if not records:
        raise BulkFileError(f"{name}: no rows; write one order_ref[,item_id] per line")
    columns: list[str] = [HEADER_FIRST, ITEM_COLUMN]
    first_line, first = records[0]
    if first[0].strip().lower() == HEADER_FIRST:
        columns = [c.strip() for c in first]
        _check_header(columns, name, first_line)
        records = records[1:]
        if not records:
            raise BulkFileError(f"{name}: only a header, no rows")
    rows: list[EventRow] = []
    seen: dict[tuple[str, int | None], int] = {}
    for line, cells in records:
        row = _row(line, cells, columns, name)
        key = (row.order_ref, row.item_id)
        if row.problem is None and key in seen:
            what = f"item {row.item_id} of order" if row.item_id is not None else "order"
            row = EventRow(line, row.order_ref, row.item_id, row.data,
                           f"duplicate: {what} {row.order_ref} is on line {seen[key]} already")
        elif row.problem is None:
            seen[key] = line
        rows.append(row)
    return rows


def _numbered(reader: Any) -> Iterable[tuple[int, list[str]]]:
    """Rows with the file line each starts on (a quoted cell may span lines)."""
    start = 1
    for cells in reader:
        yield start, cells
        start = reader.line_num + 1


def _check_header(columns: Sequence[str], name: str, line: int) -> None:
    if any(not c for c in columns):
        raise BulkFileError(f"{name}:{line}: the header has an empty column name")
    dupes = sorted({c for c in columns if columns.count(c) > 1})
    if dupes:
        raise BulkFileError(f"{name}:{line}: column {dupes[0]!r} appears twice in the header")
    if ITEM_COLUMN in columns[2:]:
        raise BulkFileError(f"{name}:{line}: {ITEM_COLUMN!r} must be the second column")


def _row(line: int, cells: list[str], columns: Sequence[str], name: str) -> EventRow:
    cells = [c.strip() for c in cells]
    ref = cells[0] if cells else ""
    if len(cells) > len(columns):
        extra = "name the extra columns in a header row (order_ref,item_id,<data key>,…)" \
            if len(columns) == 2 and columns[1] == ITEM_COLUMN else "more cells than the header"
        return EventRow(line, ref, None, {}, f"{len(cells)} cells: {extra}")
    values = dict(zip(columns, cells + [""] * (len(columns) - len(cells)), strict=True))
    if not ref:
        return EventRow(line, ref, None, {}, "order_ref is empty")
    item_id: int | None = None
    raw_item = values.get(ITEM_COLUMN, "")
    if raw_item:
        if not raw_item.isdigit() or int(raw_item) <= 0:
            return EventRow(line, ref, None, {}, f"item_id {raw_item!r} is not a positive number")
        item_id = int(raw_item)
    data = {k: v for k, v in values.items() if k not in (HEADER_FIRST, ITEM_COLUMN) and v != ""}
    return EventRow(line, ref, item_id, data)


# -- checking and firing -----------------------------------------------------------------------
def _trigger_takes_data(engine: Engine) -> bool:
    """Event data needs ``Engine.trigger(..., data=…)`` (issue 12); older engines refuse it."""
    return "data" in inspect.signature(engine.trigger).parameters


def _check_rows(
    engine: Engine, event: str, rows: Sequence[EventRow]
) -> tuple[dict[int, RowResult], dict[int, list[OrderItem]]]:
    """Refuse what cannot fire (looked up in a few queries for the whole file); for the rest,
    the items each row applies to as the engine would choose them now."""
    from ratepay_oms.engine.engine import _select_for_event

    results: dict[int, RowResult] = {}
    chosen: dict[int, list[OrderItem]] = {}
    definitions = engine.definitions()
    refs = sorted({r.order_ref for r in rows if r.problem is None})
    takes_data = _trigger_takes_data(engine)
    with engine.session() as session:
        orders: dict[str, Order] = {}
        items: dict[int, list[OrderItem]] = {}
        for start in range(0, len(refs), READ_CHUNK):
            part = refs[start : start + READ_CHUNK]
            for order in session.scalars(select(Order).where(Order.order_ref.in_(part))):
                orders[order.order_ref] = order
        ids = [o.id for o in orders.values()]
        for start in range(0, len(ids), READ_CHUNK):
            id_part = ids[start : start + READ_CHUNK]
            for item in session.scalars(
                select(OrderItem).where(OrderItem.order_id.in_(id_part)).order_by(OrderItem.id)
            ):
                items.setdefault(item.order_id, []).append(item)
        session.expunge_all()
    for row in rows:
        result = RowResult(row.line, row.order_ref, row.item_id, REFUSED)
        results[row.line] = result
        if row.problem is not None:
            result.reason = row.problem
            continue
        if row.data and not takes_data:
            result.reason = "event data columns need an engine whose trigger takes data"
            continue
        found = orders.get(row.order_ref)
        if found is None:
            result.reason = f"no order {row.order_ref!r}"
            continue
        definition = definitions.get(found.process)
        if definition is None:
            result.reason = f"process {found.process!r} of order {row.order_ref} is not loaded"
            continue
        try:
            picked = _select_for_event(
                definition,
                row.order_ref,
                event,
                items.get(found.id, []),
                None if row.item_id is None else [row.item_id],
            )
        except ManualEventError as exc:
            result.reason = str(exc)
            continue
        chosen[row.line] = picked
        result.items = [i.id for i in picked]
        result.status = ACCEPTED
    return results, chosen


def _would(engine: Engine, event: str, items: Sequence[OrderItem]) -> list[dict[str, Any]]:
    definitions = engine.definitions()
    out = []
    for item in items:
        definition = definitions[item.process]
        command = definition.events[event].command
        targets = [
            {"to": t.target, "if": t.condition}
            for t in definition.transitions_from(item.state, event)
        ]
        out.append({"item_id": item.id, "from": item.state, "command": command,
                    "targets": targets})
    return out


@dataclass
class _Batch:
    """Rows of one order fired as one event: same data, named items (or one all-items row)."""

    order_ref: str
    data: Mapping[str, str]
    lines: list[int]
    item_ids: list[int] | None


def _batches(rows: Sequence[EventRow], accepted: Mapping[int, RowResult]) -> list[list[_Batch]]:
    """Per order (first-seen order), its batches in file order."""
    per_order: dict[str, list[_Batch]] = {}
    for row in rows:
        if row.line not in accepted:
            continue
        batches = per_order.setdefault(row.order_ref, [])
        last = batches[-1] if batches else None
        if (
            row.item_id is not None
            and last is not None
            and last.item_ids is not None
            and dict(last.data) == dict(row.data)
        ):
            last.lines.append(row.line)
            last.item_ids.append(row.item_id)
        else:
            ids = None if row.item_id is None else [row.item_id]
            batches.append(_Batch(row.order_ref, dict(row.data), [row.line], ids))
    return list(per_order.values())


def _fire(
    engine: Engine,
    event: str,
    batch: _Batch,
    results: Mapping[int, RowResult],
    now: datetime | None,
) -> None:
    kwargs: dict[str, Any] = {"now": now}
    if batch.data:
        kwargs["data"] = dict(batch.data)
    rows = [results[line] for line in batch.lines]
    for attempt, pause in enumerate((0.0, *LOCK_RETRIES)):
        if pause:
            time.sleep(pause)
        try:
            outcome = engine.trigger(event, batch.order_ref, batch.item_ids, **kwargs)
        except OrderLockedError as exc:
            if attempt < len(LOCK_RETRIES):
                continue
            _refuse(rows, str(exc))
            return
        except (ManualEventError, OrderNotFoundError) as exc:  # changed since the check
            _refuse(rows, str(exc))
            return
        except OmsError as exc:
            _refuse(rows, str(exc), status=FAILED)
            return
        except Exception as exc:  # a database gone mid-run: report it, keep the other rows
            log.exception("bulk %s: order %s failed", event, batch.order_ref)
            first = (str(exc).strip().splitlines() or [""])[0]
            _refuse(rows, f"{type(exc).__name__}: {first}", status=FAILED)
            return
        break
    _settle_rows(rows, outcome.moved, outcome.stayed, outcome.errors, outcome.held)


def _settle_rows(
    rows: Iterable[RowResult],
    moved: Sequence[tuple[int, str, str]],
    stayed: Sequence[int],
    errors: Sequence[str],
    held: Sequence[tuple[int, str]] = (),
) -> None:
    """Each row's share of what its event did (by the row's items)."""
    for row in rows:
        mine = set(row.items)
        row.moved = [m for m in moved if m[0] in mine]
        row.stayed = [i for i in stayed if i in mine]
        waiting = sorted({why for i, why in held if i in mine})
        touched = {m[0] for m in row.moved} | set(row.stayed)
        if errors and not touched and not waiting:
            row.status = FAILED
            row.reason = "; ".join(errors)
        elif waiting and not touched:
            row.reason = "; ".join(waiting)
        elif not touched:
            row.reason = "nothing moved"


def _fire_many(
    engine: Engine,
    event: str,
    orders: Sequence[Sequence[_Batch]],
    results: Mapping[int, RowResult],
    now: datetime | None,
    concurrency: int,
) -> list[_Batch]:
    """The batches of ``orders`` through ``Engine.trigger_many`` (many orders per transaction);
    returns the batches whose order was busy, for ``trigger`` to retry."""
    from ratepay_oms.engine.many import EventRequest

    batches = [b for order in orders for b in order]
    requests = [
        EventRequest(b.order_ref, None if b.item_ids is None else tuple(b.item_ids))
        for b in batches
    ]
    outcomes = engine.trigger_many(event, requests, now=now, concurrency=concurrency)
    busy = []
    for batch, outcome in zip(batches, outcomes, strict=True):
        rows = [results[line] for line in batch.lines]
        if outcome.busy:
            busy.append(batch)
        elif outcome.refused is not None:
            _refuse(rows, outcome.refused)
        else:
            _settle_rows(rows, outcome.moved, outcome.stayed, outcome.errors, outcome.held)
    return busy


def _refuse(rows: Iterable[RowResult], reason: str, *, status: str = REFUSED) -> None:
    for row in rows:
        row.status = status
        row.reason = reason


def run_bulk_event(
    engine: Engine,
    event: str,
    rows: Sequence[EventRow],
    *,
    dry_run: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    now: datetime | None = None,
) -> BulkReport:
    """Check every row and (unless ``dry_run``) fire ``event`` for the accepted ones.

    ``concurrency``: gateway calls in flight at once (each order's rows stay in file order,
    one at a time). Orders are decided many to a transaction (``Engine.trigger_many``); rows
    with event data go through ``Engine.trigger`` one order at a time.
    """
    if concurrency < 1:
        raise ConsoleError("concurrency must be at least 1")
    started = time.perf_counter()
    results, chosen = _check_rows(engine, event, rows)
    if dry_run:
        for line, items in chosen.items():
            results[line].status = WOULD_FIRE
            results[line].would = _would(engine, event, items)
    else:
        accepted = {line: r for line, r in results.items() if r.status == ACCEPTED}
        orders = _batches(rows, accepted)
        # Orders without event data go many to a transaction; an order with data (or busy
        # when its turn came) goes through ``trigger``, which takes the data and waits.
        plain = [o for o in orders if not any(b.data for b in o)]
        one_by_one = [o for o in orders if any(b.data for b in o)]
        if plain:
            busy: dict[str, list[_Batch]] = {}
            for batch in _fire_many(engine, event, plain, results, now, concurrency):
                busy.setdefault(batch.order_ref, []).append(batch)
            one_by_one += list(busy.values())

        def work(batches: list[_Batch]) -> None:
            for batch in batches:
                _fire(engine, event, batch, results, now)

        if concurrency == 1 or len(one_by_one) <= 1:
            for batches in one_by_one:
                work(batches)
        else:
            with ThreadPoolExecutor(max_workers=concurrency,
                                    thread_name_prefix="bulk-event") as pool:
                for future in [pool.submit(work, b) for b in one_by_one]:
                    future.result()
    report = BulkReport(event, dry_run, [results[r.line] for r in rows],
                        time.perf_counter() - started)
    log.info("bulk %s: %s", event, report.counts())
    return report
