"""Persistence: the SQLAlchemy models of the OMS and how to reach and upgrade the database.

``models`` holds the tables; ``db`` creates engines and sessions with the per-dialect settings
the engine relies on, and runs Alembic (``upgrade``), which is the only way the schema changes.
"""

from ratepay_oms.persistence.db import (
    create_db_engine,
    current_revision,
    default_database_url,
    head_revision,
    session_factory,
    upgrade,
)

__all__ = [
    "create_db_engine",
    "current_revision",
    "default_database_url",
    "head_revision",
    "session_factory",
    "upgrade",
]
