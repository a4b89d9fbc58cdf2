"""The RatePAY API log as an operator reads it: which call, for which order, what came back.

The facade masks the security code before a row is written; we mask again on the way out
(``mask_xml``), because a row written by an older version, a hand-made import or a bug must
not leak the secret onto a terminal or into a ticket.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select

from ratepay_oms.console._session import session_of
from ratepay_oms.persistence.api_log import ApiLogEntry
from ratepay_oms.ratepay.api_log import is_failure
from ratepay_oms.ratepay.xml import MASK, mask_security_code

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 50

# A secret in any other spelling that could reach a text column: attributes, JSON, key=value.
_SECRET_PAIR = re.compile(
    r"""(?P<key>security[_\-\s]?code|SECURITY_CODE)(?P<sep>["']?\s*[:=]\s*["']?)(?P<value>[^\s"'<>,;&}]+)""",
    re.IGNORECASE,
)


def mask_text(text: str | None, secret: str | None = None) -> str | None:
    """``text`` with every security code hidden: XML elements, ``key=value`` / JSON pairs,
    and (if given) the literal secret wherever it occurs."""
    if text is None:
        return None
    masked = mask_security_code(text)
    masked = _SECRET_PAIR.sub(lambda m: m.group("key") + m.group("sep") + MASK, masked)
    if secret and len(secret) >= 4:
        masked = masked.replace(secret, MASK)
    return masked


@dataclass(frozen=True)
class ApiCall:
    id: int
    created_at: datetime
    operation: str
    subtype: str | None
    order_ref: str | None
    transaction_id: str | None
    success: bool | None
    status_code: str | None
    result_code: str | None
    result_text: str | None
    reason_code: str | None
    reason_text: str | None
    http_status: int | None
    error: str | None
    duration_ms: int | None
    request_xml: str | None
    response_xml: str | None

    @property
    def failed(self) -> bool:
        return is_failure(self.success, self.error)

    @property
    def operation_label(self) -> str:
        return f"{self.operation}/{self.subtype}" if self.subtype else self.operation

    def to_json(self, *, with_xml: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "created_at": self.created_at.isoformat(),
            "operation": self.operation,
            "subtype": self.subtype,
            "order_ref": self.order_ref,
            "transaction_id": self.transaction_id,
            "success": self.success,
            "failed": self.failed,
            "status_code": self.status_code,
            "result_code": self.result_code,
            "result_text": self.result_text,
            "reason_code": self.reason_code,
            "reason_text": self.reason_text,
            "http_status": self.http_status,
            "error": self.error,
            "duration_ms": self.duration_ms,
        }
        if with_xml:
            data["request_xml"] = self.request_xml
            data["response_xml"] = self.response_xml
        return data


def api_calls(
    source: Any,
    *,
    order_ref: str | None = None,
    operation: str | None = None,
    errors_only: bool = False,
    limit: int | None = DEFAULT_LIMIT,
    secret: str | None = None,
) -> list[ApiCall]:
    """The newest ``limit`` gateway calls matching the filters, newest first, secrets masked.

    ``operation`` matches the operation (``PAYMENT_REQUEST``) or ``OPERATION/SUBTYPE``
    (``PAYMENT_CHANGE/return``), case-insensitively.
    """
    entry = ApiLogEntry
    stmt = select(entry).order_by(entry.id.desc())
    if order_ref is not None:
        stmt = stmt.where(entry.order_ref == order_ref)
    if operation:
        op, _, subtype = operation.partition("/")
        stmt = stmt.where(entry.operation.ilike(op))
        if subtype:
            stmt = stmt.where(entry.subtype.ilike(subtype))
    if errors_only:
        stmt = stmt.where(
            or_(entry.success.is_(None), entry.success.is_(False), entry.error.is_not(None))
        )
    if limit is not None:
        stmt = stmt.limit(limit)
    with session_of(source) as session:
        rows = list(session.scalars(stmt))
        return [_call(row, secret) for row in rows]


def _call(row: ApiLogEntry, secret: str | None) -> ApiCall:
    return ApiCall(
        id=row.id,
        created_at=row.created_at,
        operation=row.operation,
        subtype=row.subtype,
        order_ref=row.order_ref,
        transaction_id=row.transaction_id,
        success=row.success,
        status_code=row.status_code,
        result_code=row.result_code,
        result_text=mask_text(row.result_text, secret),
        reason_code=row.reason_code,
        reason_text=mask_text(row.reason_text, secret),
        http_status=row.http_status,
        error=mask_text(row.error, secret),
        duration_ms=row.duration_ms,
        request_xml=mask_text(row.request_xml, secret),
        response_xml=mask_text(row.response_xml, secret),
    )
