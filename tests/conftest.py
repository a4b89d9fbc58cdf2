"""Shared fixtures: one throw-away database per test session and dialect.

``db_url`` is parametrised over the dialects named in ``RATEPAY_OMS_TEST_DATABASES``
(comma separated: ``sqlite``, ``postgresql``, ``mariadb``; default ``sqlite`` plus the servers
that answer). Each session creates its own database on the server (``rpoms_<random>``) and drops
it at the end, so parallel sessions never see each other's rows. Under ``CI=true`` a dialect
that was asked for and does not answer fails the run instead of skipping.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "RATEPAY_OMS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_ADMIN_URL = os.environ.get(
    "RATEPAY_OMS_TEST_MARIADB_URL", "mysql+pymysql://root:@127.0.0.1:3306/test"
)
pytest_plugins = ["ratepay_oms.sandbox.testing"]

IN_CI = os.environ.get("CI", "").lower() == "true"


def _requested() -> list[str]:
    raw = os.environ.get("RATEPAY_OMS_TEST_DATABASES")
    if raw:
        return [d.strip() for d in raw.split(",") if d.strip()]
    return ["sqlite", "postgresql", "mariadb"]


def _server_db(admin_url: str, dialect: str) -> Iterator[str]:
    name = f"rpoms_{secrets.token_hex(4)}"
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
    except Exception as exc:  # pragma: no cover - depends on the machine
        explicit = "RATEPAY_OMS_TEST_DATABASES" in os.environ
        if IN_CI or explicit:
            pytest.fail(f"{dialect} asked for but not reachable at {admin_url}: {exc}")
        pytest.skip(f"{dialect} not reachable: {exc}")
    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            if dialect == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture(scope="session", params=_requested())
def server_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A database URL for a fresh, empty database of one dialect (session scoped)."""
    dialect = request.param
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'oms.sqlite'}"
    elif dialect == "postgresql":
        yield from _server_db(PG_ADMIN_URL, "postgresql")
    elif dialect == "mariadb":
        yield from _server_db(MARIADB_ADMIN_URL, "mariadb")
    else:
        raise pytest.UsageError(f"unknown dialect {dialect!r} in RATEPAY_OMS_TEST_DATABASES")


@pytest.fixture
def tmp_sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file for tests that only need the embedded default."""
    return f"sqlite:///{tmp_path / 'oms.sqlite'}"
