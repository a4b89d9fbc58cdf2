"""Operator tools: recorded condition results, forced moves in history and transition log.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

``oms_condition_result`` keeps the newest answer of each condition per item (``explain``);
``forced``/``actor``/``reason`` on ``oms_state_history`` and ``oms_transition_log`` mark a move
a person forced (``order move``), with who and why.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_AUDITED = ("oms_state_history", "oms_transition_log")


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "oms_condition_result",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("process", sa.String(length=100), nullable=False),
        sa.Column("state", sa.String(length=100), nullable=False),
        sa.Column("event", sa.String(length=100), nullable=True),
        sa.Column("condition", sa.String(length=100), nullable=False),
        sa.Column("result", sa.Boolean(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("evaluated_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["item_id"],
            ["oms_order_item.id"],
            name="fk_oms_condition_result_item_id_oms_order_item",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_oms_condition_result"),
        sa.UniqueConstraint(
            "item_id", "condition", name="uq_oms_condition_result_item_condition"
        ),
    )
    op.create_index("ix_oms_condition_result_order_id", "oms_condition_result", ["order_id"])
    for table in _AUDITED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("forced", sa.Boolean(), server_default=sa.false(), nullable=False)
            )
            batch.add_column(sa.Column("actor", sa.String(length=100), nullable=True))
            batch.add_column(sa.Column("reason", sa.Text(), nullable=True))


def downgrade() -> None:
    for table in _AUDITED:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("reason")
            batch.drop_column("actor")
            batch.drop_column("forced")
    op.drop_index("ix_oms_condition_result_order_id", table_name="oms_condition_result")
    op.drop_table("oms_condition_result")
