"""``ratepay-oms db``: create or upgrade the schema, and say which revision a database is at.

These commands need no process files, so they work (and can repair a database) even while a
process folder is broken.
"""

from __future__ import annotations

import logging

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    check_database_url,
    db_option,
    require_existing_database,
    resolve_database_url,
    stdout_console,
    translate_db_errors,
)

log = logging.getLogger(__name__)


@cli.group()
def db() -> None:
    """Database schema (Alembic migrations shipped with ratepay-oms).

    \b
    Example:
      ratepay-oms db upgrade --db postgresql+psycopg://oms@db.internal/oms
      ratepay-oms db current
    """


@db.command()
@db_option
@translate_db_errors
def upgrade(db_url: str | None) -> None:
    """Bring the database to the newest schema revision (creates a SQLite file if needed).

    Safe to run on every deploy: an up-to-date database is left as it is.

    \b
    Example:
      ratepay-oms db upgrade
      ratepay-oms db upgrade --db sqlite:///var/oms.sqlite
    """
    from ratepay_oms.persistence.db import current_revision
    from ratepay_oms.persistence.db import upgrade as upgrade_schema

    url = check_database_url(resolve_database_url(db_url))
    upgrade_schema(url)
    revision = current_revision(url)
    stdout_console().print(f"database at revision {revision}", markup=False)


@db.command()
@db_option
@translate_db_errors
def current(db_url: str | None) -> None:
    """Print the schema revision the database is at ("none" if never upgraded).

    \b
    Example:
      ratepay-oms db current --db sqlite:///var/oms.sqlite
    """
    from ratepay_oms.persistence.db import current_revision

    url = check_database_url(resolve_database_url(db_url))
    require_existing_database(url)
    revision = current_revision(url)
    stdout_console().print(revision or "none", markup=False)
