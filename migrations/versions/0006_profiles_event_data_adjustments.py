"""RatePAY profiles, event data on the history, credits and debits.

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-02

- ``ratepay_profile``: the last PROFILE_REQUEST answer per configured profile name;
- ``ratepay_payment.profile``: the profile an order's transaction belongs to (every follow-up
  must use the same credentials), and ``voucher_rule``: how its voucher is settled over partial
  deliveries (fixed when the order is requested);
- ``oms_state_history.data``: what a person gave with a manual event (invoice id, tracking);
- ``ratepay_adjustment``: goodwill credits and debits (PAYMENT_CHANGE credit) per order.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0006"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def _long_text() -> sa.types.TypeEngine:
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "ratepay_profile",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("profile_id", sa.String(length=255), nullable=False),
        sa.Column("master_data", _long_text(), nullable=False),
        sa.Column("installment_config", sa.Text(), nullable=True),
        sa.Column("refreshed_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ratepay_profile"),
        sa.UniqueConstraint("name", name="uq_ratepay_profile_name"),
    )
    with op.batch_alter_table("ratepay_payment") as batch:
        batch.add_column(sa.Column("profile", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("voucher_rule", sa.String(length=20), nullable=True))
    with op.batch_alter_table("oms_state_history") as batch:
        batch.add_column(sa.Column("data", sa.Text(), nullable=True))
    op.create_table(
        "ratepay_adjustment",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("amount", sa.Numeric(precision=12, scale=2), nullable=False),
        sa.Column("tax_rate", sa.Numeric(precision=5, scale=2), nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("result_code", sa.String(length=20), nullable=True),
        sa.Column("reason_code", sa.String(length=20), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("transaction_id", sa.String(length=255), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("settled_at", _timestamp(), nullable=True),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["oms_order.id"],
            name="fk_ratepay_adjustment_order_id_oms_order",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_ratepay_adjustment"),
        sa.UniqueConstraint("request_id", name="uq_ratepay_adjustment_request_id"),
    )
    op.create_index("ix_ratepay_adjustment_order_id", "ratepay_adjustment", ["order_id"])


def downgrade() -> None:
    op.drop_index("ix_ratepay_adjustment_order_id", table_name="ratepay_adjustment")
    op.drop_table("ratepay_adjustment")
    with op.batch_alter_table("oms_state_history") as batch:
        batch.drop_column("data")
    with op.batch_alter_table("ratepay_payment") as batch:
        batch.drop_column("voucher_rule")
        batch.drop_column("profile")
    op.drop_table("ratepay_profile")
