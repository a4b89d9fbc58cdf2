"""``ratepay-oms outbox``: state-change notifications waiting, delivered or given up.

The tick delivers them (see ``ratepay_oms.engine.outbox``); these commands are for a person:
see what is stuck and why, send dead ones again once the receiver is fixed, and drop old
delivered rows. The signing secret is never shown.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click
from rich.table import Table

from ratepay_oms.cli import cli
from ratepay_oms.cli._age import Age
from ratepay_oms.cli._common import (
    engine_from_options,
    engine_options,
    fmt_time,
    print_json,
    stdout_console,
    translate_db_errors,
)
from ratepay_oms.engine.clock import wall_now
from ratepay_oms.engine.outbox import Outbox
from ratepay_oms.persistence.models import OUTBOX_DEAD, OUTBOX_DELIVERED, OUTBOX_STATUSES


@cli.group("outbox")
def outbox() -> None:
    """State-change notifications (the outbox): list, retry, purge, deliver.

    \b
    Example:
      ratepay-oms outbox list --status dead
      ratepay-oms outbox retry --all-dead
      ratepay-oms outbox purge --older-than 30d
    """


@outbox.command("list")
@engine_options
@click.option("--status", type=click.Choice([*OUTBOX_STATUSES, "all"]), default="all",
              show_default=True, help="Only notifications with this status.")
@click.option("--order", "order_ref", default=None, metavar="REF", help="Only this order.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              metavar="N", help="At most N rows, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as a JSON list.")
@translate_db_errors
def outbox_list(
    db_url: str | None,
    process_dir: Path | None,
    status: str,
    order_ref: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List notifications, newest first, with their delivery state and last error.

    \b
    Example:
      ratepay-oms outbox list --status pending --json | jq length
    """
    engine = engine_from_options(db_url, process_dir)
    views = Outbox(engine.session).list(
        status=None if status == "all" else status, order_ref=order_ref, limit=limit
    )
    if as_json:
        print_json([v.to_json() for v in views])
        return
    if not views:
        click.echo("no notifications" + ("" if status == "all" else f" with status {status}"))
        return
    table = Table()
    for column in ("id", "order", "item", "from → to", "event", "at", "status", "tries",
                   "next / delivered", "last error"):
        table.add_column(column)
    for v in views:
        when = v.delivered_at if v.status == OUTBOX_DELIVERED else (
            None if v.status == OUTBOX_DEAD else v.next_attempt_at)
        table.add_row(
            str(v.id), v.order_ref, str(v.item_id), f"{v.from_state or '∅'} → {v.to_state}",
            v.event or "", fmt_time(v.created_at), v.status, str(v.attempts), fmt_time(when),
            v.last_error or "",
        )
    stdout_console().print(table)


@outbox.command("retry")
@engine_options
@click.argument("ids", nargs=-1, type=int, metavar="[ID]...")
@click.option("--all-dead", is_flag=True, help="Every dead notification.")
@translate_db_errors
def outbox_retry(
    db_url: str | None, process_dir: Path | None, ids: tuple[int, ...], all_dead: bool
) -> None:
    """Send dead notifications again (fresh attempt budget, due now, same idempotency key).

    A pending ID is made due now. A delivered one is refused.

    \b
    Example:
      ratepay-oms outbox retry 17 18
      ratepay-oms outbox retry --all-dead
    """
    engine = engine_from_options(db_url, process_dir)
    count = Outbox(engine.session).retry(list(ids), all_dead=all_dead)
    click.echo(f"{count} notification{'s' if count != 1 else ''} due again; the next tick "
               "delivers them")


@outbox.command("purge")
@engine_options
@click.option("--older-than", type=Age(), default="30d", show_default=True,
              help="Only rows older than this (e.g. 30d, 12h).")
@click.option("--dead", "with_dead", is_flag=True, help="Dead rows too (default: delivered only).")
@click.option("--dry-run", is_flag=True, help="Count what would go, delete nothing.")
@translate_db_errors
def outbox_purge(
    db_url: str | None,
    process_dir: Path | None,
    older_than: timedelta,
    with_dead: bool,
    dry_run: bool,
) -> None:
    """Delete delivered notifications (and dead ones with --dead) older than --older-than.

    Pending notifications are never purged. To keep a copy, use `ratepay-oms prune --what
    outbox --archive FILE` instead (for orders that are finished).

    \b
    Example:
      ratepay-oms outbox purge --older-than 90d --dead --dry-run
    """
    engine = engine_from_options(db_url, process_dir)
    statuses = (OUTBOX_DELIVERED, OUTBOX_DEAD) if with_dead else (OUTBOX_DELIVERED,)
    count = Outbox(engine.session).purge(
        statuses=statuses, older_than=wall_now() - older_than, dry_run=dry_run
    )
    what = " and ".join(statuses)
    verb = "would be deleted" if dry_run else "deleted"
    click.echo(f"{count} {what} notification{'s' if count != 1 else ''} {verb}")


@outbox.command("deliver")
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@translate_db_errors
def outbox_deliver(db_url: str | None, process_dir: Path | None, as_json: bool) -> None:
    """Deliver the due notifications now (the tick does this too).

    Exit status 1 when a notification failed this time (it is retried later or dead).

    \b
    Example:
      RATEPAY_OMS_NOTIFY_URL=https://shop.example/hooks/oms ratepay-oms outbox deliver
    """
    engine = engine_from_options(db_url, process_dir)
    if not engine.notifications.enabled:
        raise click.UsageError(
            "no notification URL configured: set RATEPAY_OMS_NOTIFY_URL and "
            "RATEPAY_OMS_NOTIFY_SECRET"
        )
    result = engine.deliver_notifications()
    if as_json:
        print_json(result.to_json())
    else:
        click.echo(result.summary())
        for message in result.errors:
            click.echo(f"  {message}", err=True)
    if result.failed or result.dead:
        raise click.exceptions.Exit(1)
