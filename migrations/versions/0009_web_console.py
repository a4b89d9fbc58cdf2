"""Web console: users, sessions, the operator log, and the indexes its pages page by.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "oms_web_user",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("last_login_at", _timestamp(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_oms_web_user"),
        sa.UniqueConstraint("name", name="uq_oms_web_user_name"),
    )
    op.create_table(
        "oms_web_session",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("flash", sa.Text(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("expires_at", _timestamp(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["oms_web_user.id"],
            name="fk_oms_web_session_user_id_oms_web_user",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_oms_web_session"),
        sa.UniqueConstraint("token_hash", name="uq_oms_web_session_token_hash"),
    )
    op.create_index("ix_oms_web_session_user_id", "oms_web_session", ["user_id"])
    op.create_table(
        "oms_web_action",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_name", sa.String(length=100), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("event", sa.String(length=100), nullable=True),
        sa.Column("item_ids", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_oms_web_action"),
    )
    op.create_index("ix_oms_web_action_order_id", "oms_web_action", ["order_id"])
    op.create_index("ix_oms_order_created_at", "oms_order", ["created_at", "id"])
    op.create_index("ix_oms_order_process", "oms_order", ["process", "id"])
    op.create_index("ix_oms_order_item_order_id_state", "oms_order_item", ["order_id", "state"])
    op.create_index("ix_oms_order_item_state_order_id", "oms_order_item", ["state", "order_id"])


def downgrade() -> None:
    op.drop_index("ix_oms_order_item_state_order_id", table_name="oms_order_item")
    op.drop_index("ix_oms_order_item_order_id_state", table_name="oms_order_item")
    op.drop_index("ix_oms_order_process", table_name="oms_order")
    op.drop_index("ix_oms_order_created_at", table_name="oms_order")
    op.drop_index("ix_oms_web_action_order_id", table_name="oms_web_action")
    op.drop_table("oms_web_action")
    op.drop_index("ix_oms_web_session_user_id", table_name="oms_web_session")
    op.drop_table("oms_web_session")
    op.drop_table("oms_web_user")
