"""Where the facade records every gateway call (success, refusal, timeout, garbage).

Ratepay asks merchants to keep status/reason/result of every call; we also keep both documents
(security code masked before they get here) so a support case can be answered from the log.
A broken log must not turn a booked delivery into an exception, so sinks log their own failures
and return.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlalchemy import Connection, Dialect, Engine, Table, bindparam, insert, text
from sqlalchemy.orm import Session

from ratepay_oms.persistence.api_log import ApiLogEntry
from ratepay_oms.persistence.db import one_statement
from ratepay_oms.persistence.held import Rider, held_for
from ratepay_oms.persistence.statements import execute_rowless

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 60_000
"""Documents are cut to fit a MySQL/MariaDB ``TEXT`` column (64 KiB) on every dialect."""


@dataclass(frozen=True)
class ApiCallRecord:
    """One gateway call as it goes into the API log (documents already masked)."""

    created_at: datetime
    operation: str
    subtype: str | None
    transaction_id: str | None
    order_ref: str | None
    success: bool | None
    status_code: str | None
    reason_code: int | None
    reason_text: str | None
    result_code: int | None
    result_text: str | None
    http_status: int | None
    error: str | None
    duration_ms: int
    request_xml: str | None
    response_xml: str | None


class ApiLogSink(Protocol):
    def record(self, call: ApiCallRecord) -> None: ...


def _cut(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    if len(text) <= limit // 4:  # fits even at four UTF-8 bytes a character: not encoded
        return text
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore") + "…[truncated]"


def _short(text: str | None, limit: int) -> str | None:
    return None if text is None else text[:limit]


def to_entry(call: ApiCallRecord) -> ApiLogEntry:
    return ApiLogEntry(**to_row(call))


def to_row(call: ApiCallRecord) -> dict[str, Any]:
    """The column values of the call's ``ratepay_api_log`` row (``id`` left to the database),
    cut to the columns' sizes."""
    return dict(
        created_at=call.created_at.astimezone(UTC).replace(tzinfo=None),
        operation=call.operation[:40],
        subtype=_short(call.subtype, 40),
        transaction_id=_short(call.transaction_id, 255),
        order_ref=_short(call.order_ref, 255),
        success=call.success,
        status_code=_short(call.status_code, 20),
        reason_code=None if call.reason_code is None else str(call.reason_code),
        reason_text=_cut(call.reason_text, 4000),
        result_code=None if call.result_code is None else str(call.result_code),
        result_text=_cut(call.result_text, 4000),
        http_status=call.http_status,
        error=_cut(call.error, 4000),
        duration_ms=call.duration_ms,
        request_xml=_cut(call.request_xml, MAX_DOCUMENT_BYTES),
        response_xml=_cut(call.response_xml, MAX_DOCUMENT_BYTES),
    )


_LOG_TABLE = cast(Table, ApiLogEntry.__table__)
_INSERT_LOG = insert(_LOG_TABLE).inline()
"""Inline: no ``RETURNING id`` (which a Core insert of one row adds on PostgreSQL and SQLite
to fill ``inserted_primary_key``): nothing reads the new row's id, and fetching it back cost
about a quarter of the INSERT's CPU."""


_MAX_ROWS_PER_INSERT = 8
"""Held rows go in one INSERT of up to this many (a call makes one to three)."""
_ROW_COLUMNS = tuple(c for c in _LOG_TABLE.columns if c.name != "id")
_INSERT_ROWS: dict[tuple[str, int], Any] = {}


def _insert_rows(dialect: Dialect, count: int) -> Any:
    """One INSERT of ``count`` rows, every value a named parameter (``<column>_<row>``),
    built the first time each count is asked for. A multi-row INSERT on every database (an
    executemany runs a statement per row on PostgreSQL); as text with typed parameters
    because SQLAlchemy compiles a multi-values ``insert()`` again on every execution (it does
    not cache them), which cost more CPU than the checkouts this saves; sent as its text
    (:func:`~ratepay_oms.persistence.statements.execute_rowless`)."""
    key = (dialect.name, count)
    statement = _INSERT_ROWS.get(key)
    if statement is None:
        quote = dialect.identifier_preparer.quote
        names = ", ".join(quote(c.name) for c in _ROW_COLUMNS)
        rows = ", ".join(
            "(" + ", ".join(f":{c.name}_{i}" for c in _ROW_COLUMNS) + ")" for i in range(count)
        )
        statement = _INSERT_ROWS[key] = text(
            f"INSERT INTO {quote(_LOG_TABLE.name)} ({names}) VALUES {rows}"
        ).bindparams(*(
            bindparam(f"{c.name}_{i}", type_=c.type)
            for i in range(count) for c in _ROW_COLUMNS
        ))
    return statement


class SqlApiLogSink:
    """Writes one ``ratepay_api_log`` row per call, each in its own short transaction, or,
    while the engine sends a call, with the transaction that settles it.

    Never in the caller's unit of work alone: the row must survive even when it is rolled
    back — that is when the log is needed most. A call the engine's drive sends
    (:func:`ratepay_oms.persistence.held.holding`, same database) has its row held back and
    written by the settling transaction, all of the call's rows as one INSERT; if that
    transaction does not commit, the drive writes them here one by one after all
    (:meth:`write_each`). Everything else (the console's own calls, a facade used directly)
    writes at once.
    """

    def __init__(self, session_factory: Callable[[], Session]) -> None:
        self.session_factory = session_factory
        self._engine: Engine | None = None

    def _bind(self) -> Engine | None:
        """The engine the factory's sessions use (looked up once), or ``None`` when they are
        bound to something else (a test's connection): then a session it is."""
        if self._engine is None:
            with self.session_factory() as session:
                bind = session.get_bind()
            if not isinstance(bind, Engine):
                return None
            self._engine = bind
        return self._engine

    def record(self, call: ApiCallRecord) -> None:
        try:
            entry = to_row(call)  # a dict: an ORM object only to read its values back costs
            engine = self._bind()
            if engine is not None:
                held = held_for(engine)
                if held is not None:
                    held.add(self, entry)
                    return
        except Exception:
            log.exception(
                "could not write the RatePAY API log row for %s %s",
                call.operation,
                call.transaction_id,
            )
            return
        self._write_one(entry)

    def write_each(self, rows: list[dict[str, Any]]) -> None:
        """Each row in a transaction of its own (rows held for a settle that did not commit)."""
        for row in rows:
            self._write_one(row)

    def write_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """``rows`` on ``conn`` (the settling transaction's), as one INSERT."""
        for entry in rows:
            _fill_order(conn, entry)
        for start in range(0, len(rows), _MAX_ROWS_PER_INSERT):
            chunk = rows[start:start + _MAX_ROWS_PER_INSERT]
            execute_rowless(
                conn,
                _insert_rows(conn.dialect, len(chunk)),
                {f"{name}_{i}": value for i, row in enumerate(chunk)
                 for name, value in row.items()},
            )

    def rider(self, conn: Connection, rows: list[dict[str, Any]]) -> Rider | None:
        """``rows`` as the one INSERT :meth:`write_rows` sends, for the settle's statement
        to carry (:meth:`HeldRows.rider`); ``None`` when they take more than one."""
        if len(rows) > _MAX_ROWS_PER_INSERT:
            return None
        for entry in rows:
            _fill_order(conn, entry)
        return Rider(
            _insert_rows(conn.dialect, len(rows)),
            {f"{name}_{i}": value for i, row in enumerate(rows) for name, value in row.items()},
        )

    def _write_one(self, entry: dict[str, Any]) -> None:
        try:
            engine = self._bind()
            if engine is None:
                with self.session_factory() as session, session.begin():
                    self._write(session.connection(), entry)
                return
            # A connection of the sessions' engine, no Session: its transaction bookkeeping
            # costs more CPU than the one INSERT; the INSERT commits by itself
            # (``one_statement``).
            with one_statement(engine) as conn:
                self._write(conn, entry)
        except Exception:
            log.exception(
                "could not write the RatePAY API log row for %s %s",
                entry.get("operation"),
                entry.get("transaction_id"),
            )

    @staticmethod
    def _write(conn: Connection, entry: dict[str, Any]) -> None:
        _fill_order(conn, entry)
        conn.execute(_INSERT_LOG, entry)


def _fill_order(conn: Connection, entry: dict[str, Any]) -> None:
    if entry["order_ref"] is None and entry["transaction_id"]:
        entry["order_ref"] = _order_of_transaction(conn, entry["transaction_id"])


def _order_of_transaction(conn: Connection, transaction_id: str) -> str | None:
    """The order a transaction belongs to, so a call made without one (a status lookup) is
    still filed under it and ``log --order`` lists it."""
    from sqlalchemy import select

    from ratepay_oms.persistence.models import Order
    from ratepay_oms.persistence.payment import RatepayPayment

    return conn.scalar(
        select(Order.order_ref)
        .join(RatepayPayment, RatepayPayment.order_id == Order.id)
        .where(RatepayPayment.transaction_id == transaction_id)
        .limit(1)
    )


class MemoryApiLogSink:
    """Keeps records in a list (tests, the demo, or a shop without a database)."""

    def __init__(self) -> None:
        self.records: list[ApiCallRecord] = []

    def record(self, call: ApiCallRecord) -> None:
        self.records.append(call)


class CallCollector:
    """Passes every record on to ``inner`` and keeps a copy: the console prints the gateway
    outcome of exactly the calls one command made (``order place``, ``event``, ``tick``), and
    its exit status says whether any failed. Thread-safe (calls may run in parallel)."""

    def __init__(self, inner: ApiLogSink | None) -> None:
        self.inner = inner
        self.records: list[ApiCallRecord] = []
        self._lock = threading.Lock()

    def record(self, call: ApiCallRecord) -> None:
        with self._lock:
            self.records.append(call)
        if self.inner is not None:
            self.inner.record(call)

    def take(self) -> list[ApiCallRecord]:
        """The records collected since the last ``take``, oldest first."""
        with self._lock:
            taken, self.records = self.records, []
        return taken

    def __getattr__(self, name: str) -> Any:
        # flush()/close() of a background sink stay reachable through the collector.
        if self.inner is None:
            raise AttributeError(name)
        return getattr(self.inner, name)


def is_failure(success: bool | None, error: str | None) -> bool:
    """A call failed when the gateway said no (``success`` false), when it never answered
    properly (``error``), or when the outcome was never recorded (``success`` unknown)."""
    return success is not True or bool(error)
