"""RatePAY payment data: one payment row per order, one outcome row per item and gateway call.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Written against ``ratepay_oms.persistence.payment``; runs unchanged on SQLite, PostgreSQL and
MariaDB (named constraints, sized VARCHARs, DATETIME(6) on MariaDB).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "ratepay_payment",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("transaction_id", sa.String(length=255), nullable=True),
        sa.Column("transaction_short_id", sa.String(length=255), nullable=True),
        sa.Column("descriptor", sa.String(length=255), nullable=True),
        sa.Column("result_code", sa.String(length=20), nullable=True),
        sa.Column("reason_code", sa.String(length=20), nullable=True),
        sa.Column("customer_message", sa.Text(), nullable=True),
        sa.Column("installment_plan", sa.Text(), nullable=True),
        sa.Column("shipping_status", sa.String(length=20), nullable=False),
        sa.Column("discount_status", sa.String(length=20), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("updated_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["oms_order.id"],
            name="fk_ratepay_payment_order_id_oms_order",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_ratepay_payment"),
        sa.UniqueConstraint("order_id", name="uq_ratepay_payment_order_id"),
    )
    op.create_table(
        "ratepay_item_outcome",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("operation", sa.String(length=40), nullable=False),
        sa.Column("subtype", sa.String(length=40), nullable=True),
        sa.Column("result_code", sa.String(length=20), nullable=True),
        sa.Column("reason_code", sa.String(length=20), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("transaction_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["oms_order_item.id"],
            name="fk_ratepay_item_outcome_item_id_oms_order_item",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_ratepay_item_outcome"),
    )
    op.create_index(
        "ix_ratepay_item_outcome_item_id_action", "ratepay_item_outcome", ["item_id", "action"]
    )
    op.create_index("ix_ratepay_item_outcome_order_id", "ratepay_item_outcome", ["order_id"])


def downgrade() -> None:
    op.drop_index("ix_ratepay_item_outcome_order_id", table_name="ratepay_item_outcome")
    op.drop_index("ix_ratepay_item_outcome_item_id_action", table_name="ratepay_item_outcome")
    op.drop_table("ratepay_item_outcome")
    op.drop_table("ratepay_payment")
