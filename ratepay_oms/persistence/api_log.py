"""The RatePAY API log: one row per gateway call, secrets masked before they get here.

Written by the facade's log sink (``ratepay_oms.ratepay``), read by the console (``log``) and
by the reliability checks. Unlike Spryker's log it never stores the security code: the facade
masks it in both XML documents before handing the record over.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Index, Integer, String, Text
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from ratepay_oms.persistence.base import Base

_LONG_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
"""A basket of thousands of lines outgrows MariaDB's 64 KiB ``TEXT``."""


class ApiLogEntry(Base):
    __tablename__ = "ratepay_api_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    operation: Mapped[str] = mapped_column(String(40), nullable=False)
    subtype: Mapped[str | None] = mapped_column(String(40))
    transaction_id: Mapped[str | None] = mapped_column(String(255))
    order_ref: Mapped[str | None] = mapped_column(String(255))
    success: Mapped[bool | None] = mapped_column()
    status_code: Mapped[str | None] = mapped_column(String(20))
    reason_code: Mapped[str | None] = mapped_column(String(20))
    reason_text: Mapped[str | None] = mapped_column(Text)
    result_code: Mapped[str | None] = mapped_column(String(20))
    result_text: Mapped[str | None] = mapped_column(Text)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    """Transport-level failure (timeout, HTTP 500, malformed XML), if any."""
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    request_xml: Mapped[str | None] = mapped_column(_LONG_TEXT)
    response_xml: Mapped[str | None] = mapped_column(_LONG_TEXT)

    __table_args__ = (
        Index("ix_ratepay_api_log_order_ref", "order_ref"),
        Index("ix_ratepay_api_log_transaction_id", "transaction_id"),
    )
