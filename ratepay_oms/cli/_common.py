"""What every engine command of the console shares: options, building the Engine, printing.

One function builds the :class:`~ratepay_oms.Engine` from the command line
(:func:`engine_from_options`), so wiring in more (RatePAY services, a worker id, settings files)
changes one place. Database trouble the user can fix (a malformed ``--db`` URL, a missing driver,
a server that does not answer, a schema that was never created) becomes an :class:`OmsError`
with a hint, so ``main()`` prints one line instead of a SQLAlchemy traceback.

Machine-readable output (``--json``) goes to stdout through :func:`print_json` and nothing else
is printed to stdout in that mode; human output uses Rich on stdout, notes go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click
from rich.console import Console

from ratepay_oms.errors import OmsError

if TYPE_CHECKING:
    from ratepay_oms.engine.engine import Engine

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "RATEPAY_OMS_DATABASE_URL"
FALLBACK_DATABASE_URL = "sqlite:///ratepay-oms.sqlite"

P = ParamSpec("P")
R = TypeVar("R")


class DatabaseUnavailableError(OmsError):
    """The ``--db`` URL is malformed, names a driver that is not installed, points at a server
    that does not answer, or at a database whose schema was never created."""


def resolve_database_url(db_url: str | None) -> str:
    """``--db`` if given, else ``RATEPAY_OMS_DATABASE_URL``, else a SQLite file in the cwd.

    Defers to ``ratepay_oms.persistence.db.default_database_url`` when it exists so the
    default is defined once for the library and the console.
    """
    if db_url:
        return db_url
    try:
        from ratepay_oms.persistence.db import default_database_url
    except ImportError:  # pragma: no cover - persistence not written yet
        return os.environ.get(DATABASE_URL_ENV) or FALLBACK_DATABASE_URL
    return default_database_url()


def check_database_url(url: str) -> str:
    """Reject a URL SQLAlchemy cannot parse or has no driver for, before anything connects."""
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = sa.engine.make_url(url)
        parsed.get_dialect()
    except NoSuchModuleError:
        raise DatabaseUnavailableError(
            f"invalid database URL {_safe(url)!r}: unknown dialect or driver "
            f"{parsed.drivername!r}"
        ) from None
    except (ArgumentError, ValueError) as exc:
        raise DatabaseUnavailableError(
            f"invalid database URL {url!r}: {exc} "
            "(expected e.g. sqlite:///oms.sqlite or postgresql+psycopg://user@host/db)"
        ) from None
    except ImportError as exc:
        raise DatabaseUnavailableError(
            f"database driver for {parsed.drivername!r} is not installed: {exc.name or exc}"
        ) from None
    return url


def _safe(url: str) -> str:
    """The URL with its password hidden, for messages."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _sqlite_file(url: str) -> Path | None:
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    name = parsed.database or ""
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(name)


def require_existing_database(url: str) -> None:
    """Refuse to read from a SQLite file that does not exist instead of creating an empty one
    (a typo in ``--db`` should not leave stray files and then say "order not found")."""
    path = _sqlite_file(url)
    if path is not None and not path.exists():
        raise DatabaseUnavailableError(
            f"no database at {path}; create it with: ratepay-oms db upgrade --db {url}"
        )


@contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn the database errors a user causes into one-line :class:`OmsError` messages."""
    from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

    try:
        yield
    except (OperationalError, ProgrammingError) as exc:
        text = str(exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc)
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        lowered = first.lower()
        if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered) \
                or "doesn't exist" in lowered:
            raise DatabaseUnavailableError(
                f"database {_safe(url)} has no ratepay-oms tables ({first}); "
                f"run: ratepay-oms db upgrade --db {_safe(url)}"
            ) from None
        raise DatabaseUnavailableError(f"database {_safe(url)}: {first}") from None


def engine_from_options(
    db_url: str | None, process_dir: str | Path | None, *, concurrency: int | None = None
) -> Engine:
    """The one place the console builds an :class:`Engine` from ``--db`` / ``--processes``.

    The URL is checked (parseable, driver installed, SQLite file present) before the engine
    is built; process files are loaded by the engine and their errors surface as
    ``ProcessDefinitionError`` (an ``OmsError``).
    """
    url = check_database_url(resolve_database_url(db_url))
    require_existing_database(url)
    from ratepay_oms.engine.engine import Engine

    with database_errors(url):
        if concurrency is None:
            engine = Engine(url, process_dir=process_dir)
        else:
            engine = Engine(url, process_dir=process_dir, concurrency=concurrency)
    from ratepay_oms.plugins.ratepay.services import attach_configured_ratepay

    attach_configured_ratepay(engine)  # RATEPAY_* settings → services["ratepay"], if set
    return engine


def db_option(func: Callable[P, R]) -> Callable[P, R]:
    """``--db URL``: stored as ``db_url``; resolved by :func:`resolve_database_url`."""
    return click.option(
        "--db",
        "db_url",
        metavar="URL",
        default=None,
        help=f"SQLAlchemy database URL (default: ${DATABASE_URL_ENV}, "
        f"else {FALLBACK_DATABASE_URL}).",
    )(func)


def engine_options(func: Callable[P, R]) -> Callable[P, R]:
    """``--db URL`` and ``--processes DIR`` for commands that need the engine."""
    func = click.option(
        "--processes",
        "process_dir",
        metavar="DIR",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Processes directory (default: $RATEPAY_OMS_PROCESS_DIR, ./processes, "
        "the shipped one).",
    )(func)
    return db_option(func)


def translate_db_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Run a command so that database errors become one-line messages (see
    :func:`database_errors`); the URL is taken from the ``db_url`` keyword."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        url = resolve_database_url(kwargs.get("db_url"))  # type: ignore[arg-type]
        with database_errors(url):
            return func(*args, **kwargs)

    return wrapper


PIPE_WIDTH = 200
"""Table width when stdout is a pipe or file: wide enough that rows stay one line for grep."""


def stdout_console() -> Console:
    """Rich console on stdout; built per call so it sees the stream the command runs with.

    On a terminal Rich fits its width; into a pipe it would fall back to 80 columns and wrap
    table rows, so there we allow ``$COLUMNS`` or :data:`PIPE_WIDTH`.
    """
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console.width = PIPE_WIDTH
    return console


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def jsonable(value: Any) -> Any:
    """Dataclasses, datetimes and Decimals as JSON values (money stays an exact string)."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def print_json(value: Any) -> None:
    """Print one JSON document on stdout and nothing else (for ``--json``)."""
    if isinstance(value, str):
        click.echo(value)
        return
    click.echo(json.dumps(jsonable(value), indent=2, ensure_ascii=False))


def fmt_time(value: datetime | None) -> str:
    """Naive UTC datetimes as ``YYYY-MM-DD HH:MM:SS`` (no microseconds) for tables."""
    if value is None:
        return ""
    return value.replace(microsecond=0).isoformat(sep=" ")
