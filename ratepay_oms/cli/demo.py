"""``ratepay-oms demo``: every RatePAY flow against the built-in sandbox, no setup needed."""

from __future__ import annotations

import click

from ratepay_oms.cli import cli


@cli.command()
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    default=None,
    help="Database URL to use (default: a SQLite file in a temporary directory).",
)
def demo(db_url: str | None) -> None:
    """Run payment, cancellation, refund, partial flows, a decline and the worked example
    100045 against the in-process sandbox gateway; exit 1 if any flow ends wrong.

    \b
    Example:
      ratepay-oms demo
    """
    from ratepay_oms.cli._common import stdout_console
    from ratepay_oms.demo import run_demo

    code = run_demo(db_url, stdout_console())
    if code:
        raise SystemExit(code)
