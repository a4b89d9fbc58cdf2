"""``ratepay-oms tick``: the cron entry point that advances every waiting item.

One run calls :meth:`Engine.tick` once (retries, timeouts, on-enter leftovers, event-less
transitions); ``--loop`` keeps calling it for a worker process (at once after a tick that did
work, ``--interval`` seconds after an idle one) and stops cleanly after the current tick on
SIGTERM/SIGINT, so a deploy never cuts a tick in half.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    DatabaseUnavailableError,
    any_call_failed,
    describe_call,
    engine_from_options,
    engine_options,
    gateway_calls,
    print_json,
    stderr_console,
    stdout_console,
    translate_db_errors,
)
from ratepay_oms.engine.drive import DEFAULT_CONCURRENCY
from ratepay_oms.errors import ExitCode

if TYPE_CHECKING:
    from ratepay_oms.engine.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 10.0
"""Seconds between ticks with ``--loop``."""
DEFAULT_MAX_DB_OUTAGE = 300.0
"""Seconds a ``--loop`` worker waits for an unavailable database before it exits with 3."""
MAX_DB_BACKOFF = 60.0
"""The longest wait between two database checks during an outage."""


def parse_iso_time(text: str) -> datetime:
    """ISO 8601 with or without zone, as naive UTC (what the engine stores and compares).

    A value without a zone is taken as UTC already; ``Z`` and offsets are converted.
    Raises ``ValueError`` with a message fit for the user.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("empty time")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(
            f"not an ISO 8601 time: {text!r} (e.g. 2024-05-01T12:00:00Z or 2024-05-01)"
        ) from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


class IsoTime(click.ParamType):
    """Click type for ``--now``: a bad value is a usage error naming the option."""

    name = "ISO-TIME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_iso_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes the current tick and then returns.

    A ``threading.Event`` rather than a bool so the wait between ticks wakes at once.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """Install the handlers for the duration of the loop and put the old ones back after."""
    previous = {sig: signal.signal(sig, flag.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_one(engine: Engine, now: datetime | None, limit: int | None, as_json: bool) -> int:
    """One tick; returns its exit status (``ExitCode``): the database was lost during the tick,
    a gateway call failed or was refused or a command failed, or all well."""
    return _tick_once(engine, now, limit, as_json)[0]


def _tick_once(
    engine: Engine, now: datetime | None, limit: int | None, as_json: bool
) -> tuple[int, bool]:
    """One tick: its exit status and whether it did work (moved items, ran commands, fired
    timeouts). A loop worker that did work ticks again at once: what its work led to (and
    what arrived meanwhile) is due now, and waiting the interval would only idle it."""
    if not as_json and sys.stdout.isatty():
        result = _tick_with_progress(engine, now, limit)
    else:
        result = engine.tick(now=now, limit=limit)
    from ratepay_oms.ratepay.api_log import is_failure

    calls = gateway_calls(engine)
    if as_json:
        print_json(result.to_json())
    else:
        click.echo(result.summary())
        for call in calls:
            if is_failure(call.success, call.error):
                click.echo(describe_call(call))
    busy = bool(result.items_moved or result.commands_run or result.timeouts_fired)
    if result.errors and _database_problem(engine) is not None:
        return ExitCode.DATABASE_UNAVAILABLE, False
    if result.errors or any_call_failed(calls):
        return ExitCode.GATEWAY_FAILED, busy
    return ExitCode.OK, busy


def _database_problem(engine: Engine) -> str | None:
    from ratepay_oms.persistence.db import schema_problem

    return schema_problem(engine.db)


def _tick_with_progress(engine: Engine, now: datetime | None, limit: int | None) -> Any:
    """A Rich progress bar (terminal only): the engine reports items processed so far."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("tick"),
        BarColumn(),
        MofNCompleteColumn() if limit else TextColumn("{task.completed} items"),
        TimeElapsedColumn(),
        console=stdout_console(),
        transient=True,
    ) as progress:
        task = progress.add_task("tick", total=limit)
        report: Callable[[int], None] = lambda done: progress.update(task, completed=done)  # noqa: E731
        return engine.tick(now=now, limit=limit, progress=report)


@contextmanager
def _metrics_server(engine: Engine, port: int | None, host: str | None) -> Iterator[None]:
    """The worker's /metrics (database figures and its own counters) while the loop runs."""
    if port is None:
        yield
        return
    from ratepay_oms.cli.metrics import start_metrics_server
    from ratepay_oms.ops.metrics import DEFAULT_HOST, build_registry

    registry = build_registry(engine.session, engine.definitions())
    with start_metrics_server(registry, port, host or DEFAULT_HOST):
        yield


@cli.command()
@engine_options
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Process at most N items in this tick.")
@click.option("--now", type=IsoTime(), default=None,
              help="Run as if it were this time (ISO 8601; zone optional, UTC assumed).")
@click.option("--loop", is_flag=True,
              help="Keep ticking until stopped: at once after a tick that did work, else "
              "after --interval seconds.")
@click.option("--interval", type=click.FloatRange(min=0.0), default=None, metavar="S",
              help="Seconds an idle --loop worker waits before it looks again (default 10).")
@click.option("--max-db-outage", type=click.FloatRange(min=0.0), default=None, metavar="S",
              help=f"With --loop: give up (exit 3) when the database has been unavailable "
              f"this many seconds (default {DEFAULT_MAX_DB_OUTAGE:g}).")
@click.option("--json", "as_json", is_flag=True,
              help="Print each tick's result as JSON (one document per tick).")
@click.option("--concurrency", type=click.IntRange(min=1), default=DEFAULT_CONCURRENCY,
              show_default=True, metavar="K",
              help="Gateway calls in flight at once (at most one per order; 1: one by one).")
@click.option("--metrics-port", type=click.IntRange(min=0, max=65535), default=None,
              metavar="P", help="With --loop: serve Prometheus /metrics on port P (0: any).")
@click.option("--metrics-host", default=None, metavar="ADDR",
              help="Address for --metrics-port (default 127.0.0.1).")
@translate_db_errors
def tick(
    db_url: str | None,
    process_dir: Path | None,
    limit: int | None,
    now: datetime | None,
    loop: bool,
    interval: float | None,
    max_db_outage: float | None,
    as_json: bool,
    concurrency: int,
    metrics_port: int | None,
    metrics_host: str | None,
) -> None:
    """Advance every item that is due: retries, timeouts, on-enter events, event-less moves.

    Run it from cron (once) or as a worker (--loop). Prints items moved, commands run and
    errors, and every gateway call that failed or was refused; a failing command leaves its
    items in place with a retry scheduled. Exit status: 0 all well, 3 the database is
    unavailable or not upgraded, 4 a gateway call failed or was refused or a command failed.
    With --loop the worker waits out a database outage (logged, backing off) and exits 3 only
    after --max-db-outage seconds.

    \b
    Example:
      ratepay-oms tick
      ratepay-oms tick --now 2024-08-01T00:00:00Z --limit 1000
      ratepay-oms tick --loop --interval 30 --json
      ratepay-oms tick --loop --concurrency 16
      ratepay-oms tick --loop --metrics-port 9464
    """
    if interval is not None and not loop:
        raise click.UsageError("--interval only makes sense with --loop")
    if (metrics_port is not None or metrics_host is not None) and not loop:
        raise click.UsageError("--metrics-port only makes sense with --loop")
    if metrics_host is not None and metrics_port is None:
        raise click.UsageError("--metrics-host needs --metrics-port")
    if max_db_outage is not None and not loop:
        raise click.UsageError("--max-db-outage only makes sense with --loop")
    engine = engine_from_options(db_url, process_dir, concurrency=concurrency)
    if not loop:
        problem = _database_problem(engine)
        if problem is not None:
            raise DatabaseUnavailableError(problem)
        code = _run_one(engine, now, limit, as_json)
        if code:
            raise click.exceptions.Exit(code)
        return
    flag = StopFlag()
    pause = DEFAULT_INTERVAL if interval is None else interval
    outage_limit = DEFAULT_MAX_DB_OUTAGE if max_db_outage is None else max_db_outage
    outage = DatabaseOutage(outage_limit, pause)
    # The schema check (alembic's current revision: a connection and a query) runs before the
    # first tick and after a tick that did not end well; a tick that went well has just shown
    # the database is there, so an idle worker does not pay for it every interval. A tick
    # that loses the database counts errors (or raises) and the next round checks again.
    from sqlalchemy.exc import DBAPIError

    check = True
    with stop_on_signals(flag), _metrics_server(engine, metrics_port, metrics_host):
        while not flag.is_set:
            if check:
                problem = _database_problem(engine)
                if problem is not None:
                    wait = outage.failed(problem)  # DatabaseUnavailableError past the limit
                    if flag.wait(wait):
                        break
                    continue
                outage.recovered()
            busy = False
            try:
                code, busy = _tick_once(engine, now, limit, as_json)
                check = code != ExitCode.OK
            except DBAPIError:
                log.warning("tick lost the database; checking it before the next tick")
                check = True
            if flag.wait(0.0 if busy else pause):
                break
    if not as_json:
        stderr_console().print(f"stopped by {flag.signal_name or 'signal'} after the current tick")
    log.info("tick loop stopped by %s", flag.signal_name)


class DatabaseOutage:
    """The ``--loop`` worker's patience with a database that is away: each failed check is
    logged with the next wait (backing off from the interval, doubling, at most
    ``MAX_DB_BACKOFF`` s); once it has been away longer than ``limit`` seconds the worker gives
    up with ``DatabaseUnavailableError`` (exit status 3), so systemd or the supervisor sees it."""

    def __init__(self, limit: float, interval: float) -> None:
        self.limit = limit
        self.interval = max(interval, 1.0)
        self.since: float | None = None
        self.failures = 0

    def failed(self, problem: str) -> float:
        clock = time.monotonic()
        if self.since is None:
            self.since = clock
        self.failures += 1
        away = clock - self.since
        if away >= self.limit:
            raise DatabaseUnavailableError(
                f"{problem} (for {away:.0f} s, longer than --max-db-outage {self.limit:g} s; "
                "giving up)"
            )
        wait = min(self.interval * 2 ** (self.failures - 1), MAX_DB_BACKOFF,
                   self.limit - away)
        log.error("%s; tick retries in %.0f s (gives up after %g s away)", problem, wait,
                  self.limit)
        return max(wait, 0.1)

    def recovered(self) -> None:
        if self.since is not None:
            log.warning("database is back after %.0f s", time.monotonic() - self.since)
        self.since = None
        self.failures = 0
