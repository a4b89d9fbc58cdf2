"""Gateway-call intents: ``oms_intent`` and the item's ``intent_id``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "oms_intent",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("process", sa.String(length=100), nullable=False),
        sa.Column("state", sa.String(length=100), nullable=False),
        sa.Column("event", sa.String(length=100), nullable=True),
        sa.Column("command", sa.String(length=100), nullable=False),
        sa.Column("item_ids", sa.Text(), nullable=False),
        sa.Column(
            "summary", sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb"), nullable=False
        ),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("resolution", sa.String(length=40), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("reconcile_at", _timestamp(), nullable=True),
        sa.Column("settled_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_oms_intent"),
    )
    op.create_index("ix_oms_intent_status", "oms_intent", ["status"])
    op.create_index("ix_oms_intent_order_id", "oms_intent", ["order_id"])
    with op.batch_alter_table("oms_order_item") as batch:
        batch.add_column(sa.Column("intent_id", sa.Integer(), nullable=True))
        batch.create_index("ix_oms_order_item_intent_id", ["intent_id"])


def downgrade() -> None:
    with op.batch_alter_table("oms_order_item") as batch:
        batch.drop_index("ix_oms_order_item_intent_id")
        batch.drop_column("intent_id")
    op.drop_index("ix_oms_intent_order_id", table_name="oms_intent")
    op.drop_index("ix_oms_intent_status", table_name="oms_intent")
    op.drop_table("oms_intent")
