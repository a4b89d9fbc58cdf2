"""Pruning: drop old audit rows of finished orders, in short batches, optionally archived.

An order is *finished* when every one of its items rests in a final state of its process
(a state no transition leaves) and has rested there since before the cutoff: nothing will
ever read its history to decide a move again. For such orders the rows created before the
cutoff go, table by table (``--what``): state history, transition log, RatePAY API log (by
order reference), outbox (delivered or dead rows only: a pending notification is never
dropped). API log rows without an order reference go with the order whose other calls carry
the same transaction id (PAYMENT_INIT, status look-ups); those without either (profile and
configuration requests) go when they are older than the cutoff. Orders, items,
intents and timeouts are never touched.

Batches keep every transaction short, so workers and the console are never locked out for
long: finished orders are found ``order_batch`` at a time (keyset on the order id), and rows
are deleted by primary key at most ``row_batch`` per transaction. With an archive, each
batch is written (gzip JSON Lines, one ``{"table", "row"}`` object per removed row) and
flushed to disk *before* the transaction that deletes it commits: a crash can leave a row
archived but not yet deleted (the next run archives it again), never deleted but not archived.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    delete,
    exists,
    false,
    func,
    not_,
    or_,
    select,
)
from sqlalchemy.orm import Session

from ratepay_oms.engine.persist import chunked, id_in
from ratepay_oms.errors import OmsError
from ratepay_oms.persistence.models import (
    OUTBOX_DEAD,
    OUTBOX_DELIVERED,
    ApiLogEntry,
    Order,
    OrderItem,
    OutboxEntry,
    StateHistory,
    TransitionLog,
)
from ratepay_oms.process.model import ProcessDefinition

log = logging.getLogger(__name__)

WHAT: dict[str, Any] = {
    "history": StateHistory,
    "log": TransitionLog,
    "api-log": ApiLogEntry,
    "outbox": OutboxEntry,
}
"""``--what`` names and their tables (all by default)."""

ORDER_BATCH = 500
ROW_BATCH = 5000


class PruneError(OmsError):
    """A prune that cannot start as asked (unknown ``--what``, archive file exists, …)."""


@dataclass
class PruneReport:
    cutoff: datetime
    dry_run: bool
    what: tuple[str, ...]
    orders: int = 0
    """Finished orders whose rows were looked at."""
    removed: dict[str, int] = field(default_factory=dict)
    archive: str | None = None
    duration_s: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.removed.values())

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        parts = ", ".join(f"{self.removed.get(w, 0)} {w}" for w in self.what)
        text = (
            f"prune: {self.orders} finished orders before "
            f"{self.cutoff.replace(microsecond=0).isoformat(sep=' ')}; "
            f"{verb} {parts} rows in {self.duration_s:.2f} s"
        )
        if self.archive and not self.dry_run:
            text += f"; archived to {self.archive}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff.isoformat(),
            "dry_run": self.dry_run,
            "what": list(self.what),
            "orders": self.orders,
            "removed": {w: self.removed.get(w, 0) for w in self.what},
            "total": self.total,
            "archive": self.archive,
            "duration_s": round(self.duration_s, 3),
        }


def parse_what(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``history,log`` → ``("history", "log")``; all tables for ``None``."""
    if text is None:
        return tuple(WHAT)
    names = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in WHAT]
    if unknown or not names:
        raise PruneError(
            f"unknown --what {', '.join(unknown) or '(empty)'}; choose from {', '.join(WHAT)}"
        )
    return tuple(dict.fromkeys(names))


def _json_default(value: Any) -> Any:
    """Only the values JSON lacks reach here (the C encoder handles the rest)."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot archive a {type(value).__name__}")


class _Archive:
    """Gzip JSON Lines, flushed to disk after every batch (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._raw: IO[bytes] = open(path, "xb")  # noqa: SIM115 - closed in close()
        except FileExistsError:
            raise PruneError(
                f"archive {path} exists already; give a new file name (nothing was removed)"
            ) from None
        except OSError as exc:
            raise PruneError(f"cannot create archive {path}: {exc.strerror}") from None
        # zlib's default level: level 9 costs twice the time for a few per cent.
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6)
        self._encode = json.JSONEncoder(
            ensure_ascii=False, separators=(",", ":"), default=_json_default
        ).encode

    def write(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        encode, head = self._encode, '{"table":' + json.dumps(table) + ',"row":'
        lines = [head + encode(row) + "}" for row in rows]
        self._gz.write(("\n".join(lines) + "\n").encode())

    def sync(self) -> None:
        self._gz.flush()  # a full flush point: what was written so far is readable
        self._raw.flush()
        os.fsync(self._raw.fileno())

    def close(self) -> None:
        self._gz.close()
        self._raw.close()


def read_archive(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(table, row)`` for every row in an archive (values as JSON: times are ISO text)."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                entry = json.loads(line)
                yield entry["table"], entry["row"]


class Pruner:
    """One prune run over the database behind ``sessions`` (see the module docstring)."""

    def __init__(
        self,
        sessions: Callable[[], Session],
        definitions: Mapping[str, ProcessDefinition],
        *,
        order_batch: int = ORDER_BATCH,
        row_batch: int = ROW_BATCH,
    ) -> None:
        self.sessions = sessions
        self.definitions = definitions
        self.order_batch = order_batch
        self.row_batch = row_batch
        self._txids_for: tuple[str, ...] | None = None
        self._txids: list[str] = []

    def _final(self) -> ColumnElement[bool]:
        clauses = []
        for name, definition in self.definitions.items():
            finals = [s for s in definition.states if definition.is_final(s)]
            if finals:
                clauses.append(and_(OrderItem.process == name, OrderItem.state.in_(finals)))
        return or_(*clauses) if clauses else false()

    def finished_orders(
        self, session: Session, cutoff: datetime, after: int
    ) -> list[tuple[int, str]]:
        """The next ``order_batch`` finished orders after id ``after``: (id, order_ref)."""
        unfinished = exists().where(
            OrderItem.order_id == Order.id,
            or_(not_(self._final()), OrderItem.state_entered_at >= cutoff),
        )
        has_items = exists().where(OrderItem.order_id == Order.id)
        rows = session.execute(
            select(Order.id, Order.order_ref)
            .where(Order.id > after, has_items, ~unfinished)
            .order_by(Order.id)
            .limit(self.order_batch)
        ).all()
        return [(r[0], r[1]) for r in rows]

    def _where(
        self, name: str, cutoff: datetime, ids: Sequence[int], refs: Sequence[str], session: Session
    ) -> ColumnElement[bool]:
        model = WHAT[name]
        if name == "api-log":
            # Calls before the order reference was known (PAYMENT_INIT) and status look-ups
            # carry only the transaction id: they go with the order whose calls share it.
            txids = self._transaction_ids(session, refs)
            linked = or_(
                ApiLogEntry.order_ref.in_(list(refs)),
                and_(ApiLogEntry.order_ref.is_(None), ApiLogEntry.transaction_id.in_(txids)),
            )
            return and_(linked, ApiLogEntry.created_at < cutoff)
        clause = and_(id_in(model.order_id, ids, session), model.created_at < cutoff)
        if name == "outbox":
            clause = and_(clause, OutboxEntry.status.in_([OUTBOX_DELIVERED, OUTBOX_DEAD]))
        return clause

    def _transaction_ids(self, session: Session, refs: Sequence[str]) -> list[str]:
        """The RatePAY transaction ids of the orders ``refs``, read once per order batch
        (before any of their rows is deleted, so later row batches still find them)."""
        key = tuple(refs)
        if self._txids_for != key:
            self._txids = sorted(
                t
                for t in session.scalars(
                    select(ApiLogEntry.transaction_id)
                    .where(ApiLogEntry.order_ref.in_(list(refs)))
                    .where(ApiLogEntry.transaction_id.is_not(None))
                    .distinct()
                )
                if t
            )
            self._txids_for = key
        return self._txids

    def run(
        self,
        cutoff: datetime,
        what: Sequence[str] | None = None,
        *,
        dry_run: bool = False,
        archive: str | Path | None = None,
    ) -> PruneReport:
        chosen = parse_what(list(what) if what is not None else None)
        report = PruneReport(cutoff=cutoff, dry_run=dry_run, what=chosen,
                             removed=dict.fromkeys(chosen, 0))
        started = time.perf_counter()
        sink = _Archive(Path(archive)) if archive is not None and not dry_run else None
        report.archive = str(archive) if archive is not None else None
        try:
            after = 0
            while True:
                with self.sessions() as session:
                    batch = self.finished_orders(session, cutoff, after)
                if not batch:
                    break
                after = batch[-1][0]
                report.orders += len(batch)
                ids = [b[0] for b in batch]
                refs = [b[1] for b in batch]
                for name in chosen:
                    report.removed[name] += self._drain(name, cutoff, ids, refs, dry_run, sink)
            if "api-log" in chosen:
                report.removed["api-log"] += self._drain_orderless(cutoff, dry_run, sink)
        finally:
            if sink is not None:
                sink.close()
        report.duration_s = time.perf_counter() - started
        log.info("%s", report.summary())
        return report

    def _drain(
        self,
        name: str,
        cutoff: datetime,
        ids: Sequence[int],
        refs: Sequence[str],
        dry_run: bool,
        sink: _Archive | None,
    ) -> int:
        """One table's rows of one batch of finished orders: their ids in one read (through
        the order_id index; bounded by the order batch), then deleted ``row_batch`` at a time.

        No ``LIMIT`` on that read: with one, PostgreSQL prefers scanning the table until it has
        enough rows, and an order's rows are spread over the whole table, so every batch read
        most of it."""
        model = WHAT[name]
        with self.sessions() as session:
            where = self._where(name, cutoff, ids, refs, session)
            if dry_run:
                return int(
                    session.scalar(select(func.count()).select_from(model).where(where)) or 0
                )
            doomed = sorted(session.scalars(select(model.id).where(where)))
        for part in chunked(doomed, self.row_batch):
            self._delete_ids(model, part, sink)
        return len(doomed)

    def _delete_ids(self, model: Any, ids: Sequence[int], sink: _Archive | None) -> None:
        """Delete rows ``ids`` of ``model`` in one short transaction, archived first."""
        table: Table = model.__table__
        with self.sessions() as session, session.begin():
            if sink is not None:
                result = session.connection().execute(
                    select(table).where(id_in(model.id, ids, session)).order_by(table.c.id)
                )
                keys = list(result.keys())
                rows = [dict(zip(keys, r, strict=True)) for r in result.all()]
                if rows:
                    sink.write(str(table.name), rows)
                    sink.sync()  # on disk before the delete commits
            session.execute(
                delete(model)
                .where(id_in(model.id, ids, session))
                .execution_options(synchronize_session=False)
            )

    def _drain_orderless(self, cutoff: datetime, dry_run: bool, sink: _Archive | None) -> int:
        return self._delete_where(
            "api-log",
            where_of=lambda _s: and_(
                ApiLogEntry.order_ref.is_(None),
                ApiLogEntry.transaction_id.is_(None),
                ApiLogEntry.created_at < cutoff,
            ),
            dry_run=dry_run,
            sink=sink,
        )

    def _delete_where(
        self,
        name: str,
        *,
        where_of: Callable[[Session], ColumnElement[bool]],
        dry_run: bool,
        sink: _Archive | None,
    ) -> int:
        """Delete the rows of ``WHAT[name]`` matching ``where_of`` (rows tied to no order),
        walking the primary key ``row_batch`` at a time, each batch archived first. Returns the
        count (would-be, if dry)."""
        model = WHAT[name]
        table: Table = model.__table__
        if dry_run:
            with self.sessions() as session:
                return int(
                    session.scalar(select(func.count()).select_from(table).where(where_of(session)))
                    or 0
                )
        total = 0
        after = 0
        while True:
            with self.sessions() as session:
                ids = list(
                    session.scalars(
                        select(model.id)
                        .where(where_of(session), model.id > after)
                        .order_by(model.id)
                        .limit(self.row_batch)
                    )
                )
            if not ids:
                return total
            self._delete_ids(model, ids, sink)
            after = ids[-1]
            total += len(ids)
