"""``ratepay-oms prune``: drop old audit rows of finished orders (see ``console.prune``)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import click

from ratepay_oms.cli import cli
from ratepay_oms.cli._age import Age
from ratepay_oms.cli._common import (
    engine_from_options,
    engine_options,
    print_json,
    translate_db_errors,
)
from ratepay_oms.cli.tick import IsoTime
from ratepay_oms.console.prune import WHAT, Pruner, parse_what
from ratepay_oms.engine.clock import wall_now


@cli.command()
@engine_options
@click.option("--older-than", type=Age(), required=True,
              help="Rows older than this (e.g. 365d, 52w) of orders finished that long ago.")
@click.option("--what", "what", default=",".join(WHAT), show_default=True, metavar="LIST",
              help=f"Comma-separated tables: {', '.join(WHAT)}.")
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
@click.option("--archive", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE.jsonl.gz",
              help="Write every removed row here first (gzip JSON Lines; must not exist).")
@click.option("--now", type=IsoTime(), default=None,
              help="Measure the age from this time instead of now (ISO 8601, UTC).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@translate_db_errors
def prune(
    db_url: str | None,
    process_dir: Path | None,
    older_than: timedelta,
    what: str,
    dry_run: bool,
    archive: Path | None,
    now: datetime | None,
    as_json: bool,
) -> None:
    """Remove history, transition log, API log and outbox rows of finished orders.

    An order is finished when all its items rest in final states and have since before the
    cutoff (now minus --older-than); only its rows older than the cutoff go. Works in short
    batches, so ticks and the console keep running. Orders and items are never removed.

    \b
    Example:
      ratepay-oms prune --older-than 365d --dry-run
      ratepay-oms prune --older-than 365d --what history,log --archive 2025.jsonl.gz
    """
    chosen = parse_what(what)
    engine = engine_from_options(db_url, process_dir)
    cutoff = (now or wall_now()) - older_than
    report = Pruner(engine.session, engine.definitions()).run(
        cutoff, chosen, dry_run=dry_run, archive=archive
    )
    if as_json:
        print_json(report.to_json())
    else:
        click.echo(report.summary())
