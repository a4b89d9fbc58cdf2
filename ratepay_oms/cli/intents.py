"""``ratepay-oms intents``: gateway calls whose outcome is open, and a person's verdict on them.

Normally nobody needs this: the tick reconciles a lost answer through the transaction status
lookup. It is for the case the engine cannot decide alone (no status source, or figures that
fit neither "booked" nor "not booked"): the items wait, ``order show`` says why, and after
checking at RatePAY (merchant portal or support) a person settles the intent here.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    engine_from_options,
    engine_options,
    fmt_time,
    print_json,
    stdout_console,
    translate_db_errors,
)


@cli.group("intents")
def intents() -> None:
    """Gateway-call intents: bookings sent whose answer was lost or is unknown.

    \b
    Example:
      ratepay-oms intents list
      ratepay-oms intents resolve 17 --booked --note "delivery visible in the portal"
    """


@intents.command("list")
@engine_options
@click.option("--order", "order_ref", default=None, metavar="REF", help="Only this order.")
@click.option("--all", "show_all", is_flag=True, help="Also the settled ones (history).")
@click.option("--json", "as_json", is_flag=True, help="Print the intents as a JSON list.")
@translate_db_errors
def intents_list(
    db_url: str | None,
    process_dir: Path | None,
    order_ref: str | None,
    show_all: bool,
    as_json: bool,
) -> None:
    """List open intents (pending: the tick asks the gateway; unknown: a person decides).

    \b
    Example:
      ratepay-oms intents list --json | jq '.[] | select(.status == "unknown")'
    """
    engine = engine_from_options(db_url, process_dir, gateway=False)
    views = engine.intents(order_ref, open_only=not show_all)
    if as_json:
        print_json([v.to_json() for v in views])
        return
    if not views:
        click.echo("no open intents" if not show_all else "no intents")
        return
    table = Table(show_lines=False)
    for column in ("id", "order", "call", "items", "status", "since", "note"):
        table.add_column(column)
    for v in views:
        table.add_row(
            str(v.id),
            v.order_ref,
            str(v.summary.get("describe") or v.command),
            ",".join(str(i) for i in v.item_ids),
            v.status if v.open else f"{v.status} ({v.resolution})",
            fmt_time(v.created_at),
            v.explain() if v.open else (v.note or ""),
        )
    stdout_console().print(table)


@intents.command("resolve")
@engine_options
@click.argument("intent_id", type=int, metavar="ID")
@click.option("--booked/--not-booked", default=None,
              help="What RatePAY shows: the call was booked (items move on) or not (sent again).")
@click.option("--note", default="", help="Who checked what, kept with the intent.")
@translate_db_errors
def intents_resolve(
    db_url: str | None,
    process_dir: Path | None,
    intent_id: int,
    booked: bool | None,
    note: str,
) -> None:
    """Settle open intent ID after checking at RatePAY what was booked.

    --booked applies the call as successful and the items continue; --not-booked sends it
    again on the spot. Refused while a worker holds the order or when the intent is settled.

    \b
    Example:
      ratepay-oms intents resolve 17 --not-booked --note "nothing in the portal (A. Admin)"
    """
    if booked is None:
        raise click.UsageError("say what RatePAY shows: --booked or --not-booked")
    result = engine_from_options(db_url, process_dir).resolve_intent(
        intent_id, booked=booked, note=note
    )
    click.echo(f"intent {intent_id} resolved as {'booked' if booked else 'not booked'}")
    for item_id, source, target in result.moved:
        click.echo(f"item {item_id}: {source} → {target}")
    for message in result.errors:
        click.echo(f"note: {message}", err=True)
