"""Where the facade records every gateway call (success, refusal, timeout, garbage).

Ratepay asks merchants to keep status/reason/result of every call; we also keep both documents
(security code masked before they get here) so a support case can be answered from the log.
A broken log must not turn a booked delivery into an exception, so sinks log their own failures
and return.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from ratepay_oms.persistence.api_log import ApiLogEntry

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
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore") + "…[truncated]"


def _short(text: str | None, limit: int) -> str | None:
    return None if text is None else text[:limit]


def to_entry(call: ApiCallRecord) -> ApiLogEntry:
    return ApiLogEntry(
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


def _row(entry: ApiLogEntry) -> dict[str, Any]:
    """The column values of a new (unsaved) entry, ``id`` left to the database."""
    return {c.key: getattr(entry, c.key) for c in _LOG_TABLE.columns if c.key != "id"}


class SqlApiLogSink:
    """Writes one ``ratepay_api_log`` row per call, each in its own short transaction.

    Own transaction on purpose: the row must survive even when the caller's unit of work (the
    engine's state change) is rolled back — that is when the log is needed most.
    """

    def __init__(self, session_factory: Callable[[], Session]) -> None:
        self.session_factory = session_factory

    def record(self, call: ApiCallRecord) -> None:
        try:
            with self.session_factory() as session, session.begin():
                # One Core INSERT: the unit of work for one new object costs more CPU than
                # the row itself (the engine writes one per gateway call).
                session.connection().execute(insert(_LOG_TABLE), _row(to_entry(call)))
        except Exception:
            log.exception(
                "could not write the RatePAY API log row for %s %s",
                call.operation,
                call.transaction_id,
            )


class MemoryApiLogSink:
    """Keeps records in a list (tests, the demo, or a shop without a database)."""

    def __init__(self) -> None:
        self.records: list[ApiCallRecord] = []

    def record(self, call: ApiCallRecord) -> None:
        self.records.append(call)
