"""``ratepay-oms metrics``: the Prometheus figures, printed once or served over HTTP.

``metrics serve`` is the exporter for the database figures (items per state, open intents,
notifications, leases): run one per database. Each tick worker serves its own counters with
``tick --loop --metrics-port P``. See ``ratepay_oms.ops.metrics``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
from prometheus_client import CollectorRegistry

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    engine_from_options,
    engine_options,
    stderr_console,
    translate_db_errors,
)
from ratepay_oms.cli.tick import StopFlag, stop_on_signals
from ratepay_oms.ops.metrics import DEFAULT_HOST, MetricsServer, build_registry, render

log = logging.getLogger(__name__)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str) -> MetricsServer:
    """Start the server or fail with one line (port taken, address not ours)."""
    try:
        server = MetricsServer(registry, port, host)
    except OSError as exc:
        raise click.UsageError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from None
    stderr_console().print(f"serving metrics on {server.url}")
    return server


@cli.group("metrics")
def metrics() -> None:
    """Prometheus metrics: items per state, intents, notifications, leases.

    \b
    Example:
      ratepay-oms metrics show
      ratepay-oms metrics serve --port 9464 --host 0.0.0.0
    """


@metrics.command("show")
@engine_options
@translate_db_errors
def metrics_show(db_url: str | None, process_dir: Path | None) -> None:
    """Print the database figures once, in the Prometheus text format.

    \b
    Example:
      ratepay-oms metrics show | grep ratepay_oms_items
    """
    engine = engine_from_options(db_url, process_dir)
    registry = build_registry(engine.session, engine.definitions(), instruments_too=False,
                              process=False)
    click.echo(render(registry), nl=False)


@metrics.command("serve")
@engine_options
@click.option("--port", type=click.IntRange(min=0, max=65535), required=True, metavar="P",
              help="TCP port (0: any free port, printed on stderr).")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@translate_db_errors
def metrics_serve(db_url: str | None, process_dir: Path | None, port: int, host: str) -> None:
    """Serve /metrics (database figures) until SIGTERM or SIGINT.

    \b
    Example:
      ratepay-oms metrics serve --port 9464
    """
    engine = engine_from_options(db_url, process_dir)
    registry = build_registry(engine.session, engine.definitions(), instruments_too=False)
    flag = StopFlag()
    with stop_on_signals(flag), start_metrics_server(registry, port, host):
        while not flag.wait(3600):
            pass
    stderr_console().print(f"metrics server stopped by {flag.signal_name or 'signal'}")
