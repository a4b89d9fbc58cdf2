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

from ratepay_oms.errors import ExitCode, OmsError

if TYPE_CHECKING:
    from ratepay_oms.config import OmsConfig
    from ratepay_oms.engine.engine import Engine
    from ratepay_oms.ratepay.api_log import ApiCallRecord

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "RATEPAY_OMS_DATABASE_URL"
FALLBACK_DATABASE_URL = "sqlite:///ratepay-oms.sqlite"
"""For ``--help`` texts only (they must not import SQLAlchemy); the lookup is
``OmsConfig.resolve_database_url``."""

P = ParamSpec("P")
R = TypeVar("R")


class DatabaseUnavailableError(OmsError):
    """The ``--db`` URL is malformed, names a driver that is not installed, points at a server
    that does not answer, or at a database whose schema was never created or upgraded."""

    exit_code = ExitCode.DATABASE_UNAVAILABLE


def current_config() -> OmsConfig:
    """The config file of this command line (``--config``, ``$RATEPAY_OMS_CONFIG``,
    ``./ratepay-oms.toml``), read once per command."""
    from ratepay_oms.config import OmsConfig

    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    obj = root.obj if root is not None and isinstance(root.obj, dict) else None
    if obj is None:
        return OmsConfig.load()
    if "config" not in obj:
        obj["config"] = OmsConfig.load(obj.get("config_file"))
    return obj["config"]  # type: ignore[no-any-return]


def resolve_database_url(db_url: str | None) -> str:
    """``--db`` if given, else ``RATEPAY_OMS_DATABASE_URL``, else the config file's
    ``[oms] database_url``, else a SQLite file in the cwd (``OmsConfig.resolve_database_url``)."""
    return current_config().resolve_database_url(db_url)


class DatabaseConfigError(OmsError):
    """The database URL cannot be used as written: malformed, an unknown dialect, or a driver
    that is not installed (the message names the extra that installs it)."""


DRIVER_EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}
"""Backend → the ``ratepay-oms[extra]`` that installs its default driver (pyproject.toml)."""


def check_database_url(url: str) -> str:
    """Reject a URL SQLAlchemy cannot parse or has no driver for, before anything connects."""
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = sa.engine.make_url(url)
        dialect = parsed.get_dialect()
        dialect.import_dbapi()  # the driver module: missing → ImportError here, not mid-command
    except NoSuchModuleError:
        raise DatabaseConfigError(
            f"invalid database URL {_safe(url)!r}: unknown dialect or driver "
            f"{parsed.drivername!r}"
        ) from None
    except (ArgumentError, ValueError) as exc:
        raise DatabaseConfigError(
            f"invalid database URL {url!r}: {exc} "
            "(expected e.g. sqlite:///oms.sqlite or postgresql+psycopg://user@host/db)"
        ) from None
    except ImportError as exc:
        extra = DRIVER_EXTRAS.get(parsed.get_backend_name())
        hint = (f"pip install 'ratepay-oms[{extra}]'" if extra
                else f"install the Python driver for {parsed.drivername}")
        raise DatabaseConfigError(
            f"the database driver for {parsed.drivername} is not installed "
            f"(no module {exc.name or exc}); {hint}"
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
    from sqlalchemy.exc import DataError, DBAPIError, OperationalError, ProgrammingError

    try:
        yield
    except DataError as exc:
        text = str(exc.orig if exc.orig else exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        hint = ""
        if "incorrect string value" in first.lower():
            hint = ("; the database cannot store these characters: run "
                    f"`ratepay-oms db upgrade --db {_safe(url)}` for the utf8mb4 fix")
        raise DatabaseConfigError(
            f"database {_safe(url)} refused the data ({first}){hint}"
        ) from None
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
        raise DatabaseUnavailableError(
            f"database {_safe(url)} is unavailable: {first} "
            "(check the URL, that the server runs, and the credentials)"
        ) from None


def engine_from_options(
    db_url: str | None,
    process_dir: str | Path | None,
    *,
    gateway: bool = True,
    concurrency: int | None = None,
) -> Engine:
    """The one place the console builds an :class:`Engine` from ``--db`` / ``--processes``
    and the config file.

    The URL is checked (parseable, driver installed, SQLite file present) before the engine
    is built; process files are loaded by the engine and their errors surface as
    ``ProcessDefinitionError`` (an ``OmsError``). The engine attaches RatePAY from the
    environment and the config file itself; the console then collects the gateway calls each
    command makes (``gateway_calls``), to print their outcome and set the exit status.
    ``gateway=False`` (commands that only read) does not refuse an incomplete RatePAY
    configuration: ``order show`` works while ``RATEPAY_SECURITY_CODE`` is not exported.
    """
    config = current_config()
    if not gateway:
        import dataclasses

        config = dataclasses.replace(config, ratepay_optional=True)
    url = check_database_url(config.resolve_database_url(db_url))
    require_existing_database(url)
    from ratepay_oms.engine.engine import Engine

    with database_errors(url):
        extra: dict[str, Any] = {} if concurrency is None else {"concurrency": concurrency}
        engine = Engine(url, process_dir=process_dir, config=config, **extra)
    from ratepay_oms.plugins.ratepay.commands import SERVICE_NAME
    from ratepay_oms.ratepay.api_log import CallCollector

    facade = engine.services.get(SERVICE_NAME)
    if facade is not None and not isinstance(facade.api_log, CallCollector):
        facade.api_log = CallCollector(facade.api_log)
    return engine


def gateway_calls(engine: Engine) -> list[ApiCallRecord]:
    """The gateway calls made through ``engine`` since the last look, oldest first."""
    from ratepay_oms.plugins.ratepay.commands import SERVICE_NAME
    from ratepay_oms.ratepay.api_log import CallCollector

    facade = engine.services.get(SERVICE_NAME)
    sink = getattr(facade, "api_log", None)
    return sink.take() if isinstance(sink, CallCollector) else []


def describe_call(call: ApiCallRecord) -> str:
    """One line per gateway call: operation, verdict, result and reason (code and text)."""
    from ratepay_oms.ratepay.api_log import is_failure

    label = f"{call.operation}/{call.subtype}" if call.subtype else call.operation
    if call.error and call.result_code is None:
        return f"gateway: {label} failed: {call.error}"
    verdict = "refused" if is_failure(call.success, call.error) else "ok"
    parts = [f"gateway: {label} {verdict}"]
    if call.result_code is not None:
        parts.append(f"result {call.result_code} {call.result_text or ''}".rstrip())
    if call.reason_code is not None:
        parts.append(f"reason {call.reason_code} {call.reason_text or ''}".rstrip())
    if call.error:
        parts.append(call.error)
    return ": ".join(parts[:1]) + (": " + ", ".join(parts[1:]) if parts[1:] else "")


def call_json(call: ApiCallRecord) -> dict[str, Any]:
    """A gateway call for ``--json`` output (the ``log --json`` fields, without documents)."""
    from ratepay_oms.ratepay.api_log import is_failure

    return {
        "operation": call.operation,
        "subtype": call.subtype,
        "transaction_id": call.transaction_id,
        "order_ref": call.order_ref,
        "success": call.success,
        "failed": is_failure(call.success, call.error),
        "status_code": call.status_code,
        "result_code": call.result_code,
        "result_text": call.result_text,
        "reason_code": call.reason_code,
        "reason_text": call.reason_text,
        "http_status": call.http_status,
        "error": call.error,
        "duration_ms": call.duration_ms,
    }


def any_call_failed(calls: list[ApiCallRecord]) -> bool:
    from ratepay_oms.ratepay.api_log import is_failure

    return any(is_failure(c.success, c.error) for c in calls)


def db_option(func: Callable[P, R]) -> Callable[P, R]:
    """``--db URL``: stored as ``db_url``; resolved by :func:`resolve_database_url`."""
    return click.option(
        "--db",
        "db_url",
        metavar="URL",
        default=None,
        help=f"SQLAlchemy database URL (default: ${DATABASE_URL_ENV}, else [oms] "
        f"database_url of the config file, else {FALLBACK_DATABASE_URL}).",
    )(func)


def engine_options(func: Callable[P, R]) -> Callable[P, R]:
    """``--db URL`` and ``--processes DIR`` for commands that need the engine."""
    func = click.option(
        "--processes",
        "process_dir",
        metavar="DIR",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Processes directory (default: $RATEPAY_OMS_PROCESS_DIR, [oms] process_dir, "
        "./processes, the shipped one).",
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


class PipeSafeConsole(Console):
    """Rich's console, except that a closed pipe (``| head``) raises ``BrokenPipeError`` for
    ``main()`` to end the command quietly with status 0, instead of Rich's exit status 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def stdout_console(*, soft_wrap: bool = False) -> Console:
    """Rich console on stdout; built per call so it sees the stream the command runs with.

    On a terminal Rich fits its width; into a pipe it would fall back to 80 columns and wrap
    table rows, so there we allow ``$COLUMNS`` or :data:`PIPE_WIDTH`.
    """
    console = PipeSafeConsole(highlight=False, soft_wrap=soft_wrap)
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
