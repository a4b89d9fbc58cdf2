"""Database engines, sessions and schema upgrades, the same way for every dialect.

SQLite is the embedded default, so it gets the settings that make it behave under a cron and
a console at once: WAL (readers never block the writer), foreign keys on, a busy timeout, and
``BEGIN IMMEDIATE`` so a transaction that reads then writes takes the write lock up front
instead of failing half way with "database is locked". The last one also makes SAVEPOINTs
work, which the engine uses to roll back one failed command without losing its neighbours.

MariaDB/MySQL run at READ COMMITTED: under InnoDB's default REPEATABLE READ, the engine's
set-based deletes and inserts on neighbouring keys take gap locks and can deadlock two tick
workers that never touch the same order.

On both servers a pooled connection that sat idle for more than :data:`PING_AFTER_IDLE_SECONDS`
is pinged when it is checked out, and replaced (with every older pooled connection) when the
ping finds it dead; one handed back a moment ago is used as it is (see
``_ping_stale_connections``).

Schema changes go through Alembic only (``upgrade``); the models never ``create_all`` in
production, so what runs is what the migrations say.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.orm import Session, sessionmaker

from ratepay_oms.errors import OmsError

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "RATEPAY_OMS_DATABASE_URL"
#: The newest migration's revision. ``head_revision()`` (Alembic, reading ``migrations/``) is
#: the authority; a test keeps the two equal, so a new migration that forgets this line fails.
SCHEMA_HEAD = "0010"
#: Alembic's version table (its default name; ``migrations/env.py`` does not change it).
VERSION_TABLE = "alembic_version"
DEFAULT_SQLITE_FILE = "ratepay-oms.sqlite"
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: A pooled connection idle for longer than this is pinged before use; one handed back more
#: recently is not. A busy worker hands each connection back and takes it again within
#: milliseconds (or after a gateway call's second or so at ``--concurrency``): a round trip on
#: every checkout to ask whether it still lives cost about 1 ms of a worker's 14 ms CPU per
#: order, to learn what this process saw a moment ago. Past a couple of seconds the things
#: that kill a quiet connection become plausible (a server restart or failover, an idle
#: timeout, a firewall dropping quiet sockets), and a ping is nothing next to the idle time, so
#: those are checked as before. A connection that dies within the window (a ``KILL``, a
#: restart quicker than it) fails its first statement with a disconnect error instead, which
#: SQLAlchemy answers by dropping it and every older pooled connection; the engine meets that
#: like any database error (the batch rolls back and is retried, an intent stays open and is
#: reconciled, the tick loop checks the database before its next tick).
PING_AFTER_IDLE_SECONDS = 2.0
#: ``connection_record.info`` key: when the connection went back to the pool (``monotonic``).
#: The info dictionary is emptied when the connection is replaced, so a new one has no entry
#: and is never pinged (it has just answered the connect).
_RETURNED_AT = "ratepay_oms_returned_at"


def default_database_url() -> str:
    """``$RATEPAY_OMS_DATABASE_URL``, else a SQLite file in the working directory."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{DEFAULT_SQLITE_FILE}"


def migrations_dir() -> Path:
    """The Alembic folder: inside the installed package, or ``migrations/`` of a checkout."""
    from ratepay_oms.resources import shipped_path

    return shipped_path("migrations")


def create_db_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An SQLAlchemy engine with the per-dialect settings described in the module docstring."""
    url = url or default_database_url()
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, **kwargs)
        _configure_sqlite(engine)
        return engine
    ping_stale = "pool_pre_ping" not in kwargs  # an explicit choice is kept as it is
    if backend in ("mysql", "mariadb"):
        kwargs.setdefault("isolation_level", "READ COMMITTED")
    engine = create_engine(url, **kwargs)
    if ping_stale:
        _ping_stale_connections(engine)
    return engine


def _ping_stale_connections(engine: Engine) -> None:
    """``pool_pre_ping`` for the connections that need it: SQLAlchemy's pings every checkout,
    and a tick worker checks out about seven connections per order, each handed back moments
    before. Here ``checkin`` notes when a connection went back and ``checkout`` pings only one
    idle for more than :data:`PING_AFTER_IDLE_SECONDS` (the "custom pessimistic" handling of
    SQLAlchemy's disconnect docs). A dead one raises ``InvalidatePoolError`` (the
    ``DisconnectionError`` that also drops every older pooled connection, as a failed pre-ping
    does): the pool connects afresh and retries, and after a server restart the next
    checkouts reconnect without pinging each dead connection first. An error that is not a
    disconnect goes to the caller, as pre-ping's does."""
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _on_checkin(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:  # None: it was invalidated, nothing to remember
            record.info[_RETURNED_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.get(_RETURNED_AT)
        if returned is None:
            return
        idle = time.monotonic() - returned
        if idle <= PING_AFTER_IDLE_SECONDS:
            return
        log.debug("pinging a database connection idle for %.1f s", idle)
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if not dialect.is_disconnect(exc, dbapi_connection, None):
                raise
            log.info("a database connection idle for %.1f s was dead (%s); connecting afresh",
                     idle, exc)
            raise InvalidatePoolError(f"dead after {idle:.1f} s idle: {exc}") from exc


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy (pysqlite's own BEGIN handling breaks
        # SAVEPOINT), then set the pragmas every connection needs.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if engine.url.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


@contextmanager
def one_statement(engine: Engine) -> Iterator[Connection]:
    """A connection for one write that commits on its own (a row of the API log, an intent's
    summary): on PostgreSQL in autocommit, so the statement is its own transaction in one
    round trip instead of three (BEGIN, the statement, COMMIT), exactly as durable when it
    returns. Elsewhere an ordinary transaction: switching MariaDB's autocommit costs round
    trips of its own, and SQLite's connections keep their transaction handling (``BEGIN
    IMMEDIATE``, see ``_configure_sqlite``). Meant for one statement; a read before it is
    fine, two writes that must stand or fall together are not."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn
        return
    with engine.begin() as conn:
        yield conn


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded rows usable after commit (views are built after it)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation would choke on '%' in passwords.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


MYSQL_CHARSET = "utf8mb4"
MYSQL_COLLATION = "utf8mb4_unicode_ci"


class DatabaseCharsetError(OmsError):
    """A MariaDB/MySQL database (or one of our tables) is not utf8mb4: names, addresses and
    notes with characters outside its set (an emoji, most scripts) would be refused mid-order.
    The message holds the statements that fix it."""


def charset_fixes(conn: Connection) -> list[str]:
    """The ``ALTER`` statements that make a MariaDB/MySQL database and our tables utf8mb4;
    empty when nothing needs fixing or the dialect is not MariaDB/MySQL.

    We refuse rather than convert: changing a database's character set is the DBA's call
    (it changes the default for every other table in it), and converting a filled table locks
    it. The tables our migrations create inherit the database's set, so a utf8mb4 database is
    all it takes on a fresh install.
    """
    if conn.dialect.name not in ("mysql", "mariadb"):
        return []
    name, charset = conn.execute(text("SELECT DATABASE(), @@character_set_database")).one()
    fixes = []
    if charset != MYSQL_CHARSET:
        fixes.append(
            f"ALTER DATABASE `{name}` CHARACTER SET {MYSQL_CHARSET} COLLATE {MYSQL_COLLATION};"
        )
    tables = conn.execute(
        text(
            "SELECT table_name, table_collation FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_type = 'BASE TABLE' "
            "AND (table_name LIKE 'oms\\_%' OR table_name LIKE 'ratepay\\_%' "
            "OR table_name = 'alembic_version')"
        )
    ).all()
    for table, collation in sorted(tables):
        if not (collation or "").startswith(MYSQL_CHARSET):
            fixes.append(
                f"ALTER TABLE `{table}` CONVERT TO CHARACTER SET {MYSQL_CHARSET} "
                f"COLLATE {MYSQL_COLLATION};"
            )
    return fixes


def check_charset(url: str) -> None:
    """Refuse a MariaDB/MySQL database that is not utf8mb4, with the statements to run."""
    if make_url(url).get_backend_name() not in ("mysql", "mariadb"):
        return
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            fixes = charset_fixes(conn)
    finally:
        engine.dispose()
    if fixes:
        raise DatabaseCharsetError(
            f"database {make_url(url).render_as_string(hide_password=True)} is not "
            f"{MYSQL_CHARSET}, so orders with characters outside its set would fail; "
            f"run: {' '.join(fixes)} then ratepay-oms db upgrade again"
        )


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision`` (default: the newest).

    A MariaDB/MySQL database that is not utf8mb4 is refused first (``DatabaseCharsetError``).
    """
    from alembic import command

    url = url or default_database_url()
    check_charset(url)
    log.info("upgrading database schema to %s", revision)
    command.upgrade(_alembic_config(url), revision)


def current_revision(url: str | None = None) -> str | None:
    """The Alembic revision the database is at, ``None`` for an empty database."""
    from alembic.runtime.migration import MigrationContext

    engine = create_db_engine(url or default_database_url())
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision the migrations folder knows."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()


def schema_problem(engine: Engine) -> str | None:
    """``None`` when the database answers and its schema is at the newest revision; else one
    line saying what is wrong and what to run. The tick asks before it works, so a database
    that is down or was never upgraded is reported as such rather than as batch errors.

    Every ``tick`` process (a cron line, a ``--loop`` worker after a restart) asks this first,
    so it reads Alembic's version table with one plain query and compares it with
    :data:`SCHEMA_HEAD` instead of loading Alembic and parsing every migration script: that
    cost more CPU than the rest of an idle tick's start. Alembic is still asked when the
    revisions differ, to tell an old database from one a newer release upgraded.
    """
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    shown = engine.url.render_as_string(hide_password=True)
    # On SQLite our engines start every transaction with BEGIN IMMEDIATE (the write lock); a
    # check must not wait for a running tick's lock, so it reads through a plain connection.
    sqlite = engine.dialect.name == "sqlite"
    probe = create_engine(engine.url, poolclass=NullPool) if sqlite else engine
    try:
        with probe.connect() as conn:
            revisions = (
                list(conn.scalars(text(f"SELECT version_num FROM {VERSION_TABLE}")))
                if inspect(conn).has_table(VERSION_TABLE) else []
            )
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        return f"database {shown} is unavailable: {first}"
    finally:
        if sqlite:
            probe.dispose()
    if not revisions:
        return f"database {shown} has no ratepay-oms schema; run: ratepay-oms db upgrade"
    if len(revisions) > 1:
        return (f"database {shown} is at several schema revisions at once "
                f"({', '.join(sorted(revisions))}); run: ratepay-oms db upgrade")
    revision = revisions[0]
    if revision != SCHEMA_HEAD:
        if not _known_revision(revision):
            return (f"database {shown} is at schema revision {revision}, which this ratepay-oms "
                    f"does not know (a newer version upgraded it?); install that version")
        return (f"database {shown} is at schema revision {revision}, this ratepay-oms needs "
                f"{SCHEMA_HEAD}; run: ratepay-oms db upgrade")
    return None


def _known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory(str(migrations_dir())).get_revision(revision) is not None
    except CommandError:
        return False
