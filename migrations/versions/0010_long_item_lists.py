"""Item-id lists and gateway XML as LONGTEXT on MySQL/MariaDB.

A 10,000-unit order's intent covers 10,000 item ids: their JSON list is about 70 KB, over the
64 KiB of MariaDB's ``TEXT``, so planning its payment request failed with "Data too long". The
same holds for the web console's chosen items and, for baskets of thousands of lines, for the
API log's XML. SQLite and PostgreSQL have no such limit: nothing changes there.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    ("oms_intent", "item_ids", False),
    ("oms_web_action", "item_ids", True),
    ("ratepay_api_log", "request_xml", True),
    ("ratepay_api_log", "response_xml", True),
)


def _mysql() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    if not _mysql():
        return
    for table, column, nullable in _COLUMNS:
        op.alter_column(table, column, type_=mysql.LONGTEXT(), existing_type=sa.Text(),
                        existing_nullable=nullable)


def downgrade() -> None:
    if not _mysql():
        return
    for table, column, nullable in _COLUMNS:
        op.alter_column(table, column, type_=sa.Text(), existing_type=mysql.LONGTEXT(),
                        existing_nullable=nullable)
