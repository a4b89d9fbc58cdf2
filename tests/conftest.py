"""Shared fixtures: one throw-away database per test session and dialect.

``db_url`` is parametrised over the dialects named in ``RATEPAY_OMS_TEST_DATABASES``
(comma separated: ``sqlite``, ``postgresql``, ``mariadb``; default ``sqlite`` plus the servers
that answer). Each session creates its own database on the server (``rpoms_<random>``) and drops
it at the end, so parallel sessions never see each other's rows. Under ``CI=true`` a dialect
that was asked for and does not answer fails the run instead of skipping.

``server_only_db_url`` is the same, for tests that need row locks or several connections
(concurrent tick workers, killing a connection): only the server dialects asked for. Both
fixtures share one throw-away database per dialect, so a session creates at most one per server.
``fresh_db_url`` gives one test a database of its own, dropped right after it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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


SERVER_DIALECTS = ("postgresql", "mariadb")
_ADMIN_URLS = {"postgresql": PG_ADMIN_URL, "mariadb": MARIADB_ADMIN_URL}


def _server_requested() -> list[str]:
    return [d for d in _requested() if d in SERVER_DIALECTS]


@contextmanager
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


class _ServerDatabases:
    """One throw-away database per server dialect, created when a test first asks for it and
    dropped at the end of the session; ``server_db_url`` and ``server_only_db_url`` share it."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._urls: dict[str, str] = {}

    def url(self, dialect: str) -> str:
        if dialect not in self._urls:
            self._urls[dialect] = self._stack.enter_context(
                _server_db(_ADMIN_URLS[dialect], dialect)
            )
        return self._urls[dialect]


@pytest.fixture(scope="session")
def _server_databases() -> Iterator[_ServerDatabases]:
    with ExitStack() as stack:
        yield _ServerDatabases(stack)


@pytest.fixture(scope="session", params=_requested())
def server_db_url(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    _server_databases: _ServerDatabases,
) -> Iterator[str]:
    """A database URL for a fresh, empty database of one dialect (session scoped)."""
    dialect = request.param
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'oms.sqlite'}"
    elif dialect in SERVER_DIALECTS:
        yield _server_databases.url(dialect)
    else:
        raise pytest.UsageError(f"unknown dialect {dialect!r} in RATEPAY_OMS_TEST_DATABASES")


@pytest.fixture(scope="session", params=_server_requested() or ["none"])
def server_only_db_url(
    request: pytest.FixtureRequest, _server_databases: _ServerDatabases
) -> str:
    """Like ``server_db_url`` but only PostgreSQL and MariaDB (the ones asked for): for tests
    that need row locks or a second connection, which SQLite does not have.

    With no server dialect asked for, such a test skips, and fails under ``CI=true``.
    """
    dialect = request.param
    if dialect == "none":
        message = "needs postgresql or mariadb in RATEPAY_OMS_TEST_DATABASES"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return _server_databases.url(dialect)


@pytest.fixture(params=_requested())
def fresh_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of one dialect for this test alone (a few tenths of a second on a
    server): for a test that ticks everything due or reads every row of every table, which
    other tests' rows in the session's shared database would disturb."""
    dialect = request.param
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.sqlite'}"
    elif dialect in SERVER_DIALECTS:
        with _server_db(_ADMIN_URLS[dialect], dialect) as url:
            yield url
    else:
        raise pytest.UsageError(f"unknown dialect {dialect!r} in RATEPAY_OMS_TEST_DATABASES")


@pytest.fixture
def tmp_sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file for tests that only need the embedded default."""
    return f"sqlite:///{tmp_path / 'oms.sqlite'}"
