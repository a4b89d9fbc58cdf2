"""Operator tools: ``alerts`` (SLA limits), ``explain`` (why an item does not move) and
``order move`` (a forced move with a reason).

Thin over ``ratepay_oms.console.alerts`` and the engine (``Engine.explain``,
``Engine.force_move``); shapes of the ``--json`` documents are in ``docs/console.md``.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    engine_from_options,
    engine_options,
    fmt_time,
    print_json,
    stdout_console,
    translate_db_errors,
)
from ratepay_oms.cli.console import json_option, load_definitions, now_option, open_session
from ratepay_oms.cli.orders import order

log = logging.getLogger(__name__)


# -- alerts -----------------------------------------------------------------------------------
@cli.command("alerts")
@engine_options
@click.option("--process", "process_name", default=None, help="Only this process.")
@now_option
@json_option
def alerts(
    db_url: str | None,
    process_dir: Path | None,
    process_name: str | None,
    now: datetime | None,
    as_json: bool,
) -> int:
    """List items that sit in a state longer than its SLA (`sla: {warn: 1d, breach: 3d}` in
    the process file), by process and state, with counts and the oldest item.

    Exit status: 0 when no item is past a breach limit (warnings are listed but do not fail),
    3 when at least one is, 1 on an error. Run it from a monitor.

    \b
    Example:
      ratepay-oms alerts
      ratepay-oms alerts --json --now 2024-08-01T12:00:00 || page-the-on-call
    """
    from ratepay_oms.console.alerts import sla_alerts

    definitions = load_definitions(process_dir, required=True)
    with open_session(db_url) as session:
        report = sla_alerts(session, definitions, now=now, process=process_name)
    if as_json:
        print_json(report.to_json())
        return report.exit_code
    console = stdout_console()
    if not report.alerts:
        console.print(
            f"no item past its SLA ({report.checked} states with an SLA checked, "
            f"now {fmt_time(report.now)} UTC)",
            markup=False,
        )
        return report.exit_code
    table = Table(title=f"SLA alerts at {fmt_time(report.now)} UTC", title_justify="left")
    for name in ("level", "process", "state", "limits", "items", "breach", "warn", "oldest"):
        table.add_column(name, justify="right" if name in ("items", "breach", "warn") else "left")
    for alert in report.alerts:
        data = alert.to_json()
        limits = ", ".join(f"{k} {v}" for k, v in data["limits"].items() if v)
        oldest = data["oldest"]
        level = Text(alert.level, style="bold red" if alert.breach else "yellow")
        table.add_row(
            level,
            alert.process,
            alert.state,
            limits,
            str(alert.items),
            str(alert.breach),
            str(alert.warn),
            f"{oldest['order_ref']} item {oldest['item_id']}, {oldest['waited']} "
            f"(since {fmt_time(alert.oldest_entered_at)})",
        )
    console.print(table)
    return report.exit_code


# -- order move -------------------------------------------------------------------------------
@order.command("move")
@engine_options
@click.argument("ref")
@click.option("--item", "item_id", type=int, required=True, metavar="ID", help="The item to move.")
@click.option("--to", "to_state", required=True, metavar="STATE", help="The state to put it in.")
@click.option("--reason", default=None, metavar="TEXT",
              help="Why (required; kept in the history and the transition log).")
@click.option("--by", "actor", default=None, metavar="NAME",
              help="Who decided (default: the operating-system user).")
@now_option
@json_option
@translate_db_errors
def move(
    db_url: str | None,
    process_dir: Path | None,
    ref: str,
    item_id: int,
    to_state: str,
    reason: str | None,
    actor: str | None,
    now: datetime | None,
    as_json: bool,
) -> None:
    """Force item ID of order REF into STATE, with a reason: no event, no command.

    Refused (nothing written) without --reason, to a state the item's process does not have,
    while the item waits on an open gateway-call intent, or while a worker holds the order's
    lease. The history and the transition log mark the move as forced, with who and why; the
    next tick carries on from STATE (its timeouts are armed, its on-enter event fires).

    \b
    Example:
      ratepay-oms order move 100045 --item 7 --to "ready for shipment" \\
          --reason "payment confirmed by RatePAY support, ticket 4711" --by alice
    """
    engine = engine_from_options(db_url, process_dir)
    result = engine.force_move(ref, item_id, to_state, reason=reason or "", by=actor, now=now)
    if as_json:
        print_json(result.to_json())
        return
    click.echo(
        f"item {result.item_id}: {result.from_state} → {result.to_state} "
        f"(forced by {result.actor}: {result.reason})"
    )


# -- explain ----------------------------------------------------------------------------------
_STATUS_STYLE = {"final": "dim", "blocked": "bold red", "due": "green", "waiting": "yellow"}


@cli.command("explain")
@engine_options
@click.argument("ref")
@click.option("--item", "item_id", type=int, default=None, metavar="ID", help="Only this item.")
@now_option
@json_option
@translate_db_errors
def explain(
    db_url: str | None,
    process_dir: Path | None,
    ref: str,
    item_id: int | None,
    now: datetime | None,
    as_json: bool,
) -> None:
    """Explain why the items of order REF are where they are and why they do not move.

    Per item: its state and since when, every transition out of it (event; manual, on-enter,
    timeout or event-less; command; condition with its last recorded answer) and the reasons
    it is not moving now: a manual event it waits for, a timeout or retry due at a time, a
    condition that returned false (and what it read), an open gateway-call intent, a worker's
    lease, or a final state. Status: final, blocked (intent or lease), due (the next tick acts)
    or waiting.

    \b
    Example:
      ratepay-oms explain 100045
      ratepay-oms explain 100045 --item 7 --json
    """
    engine = engine_from_options(db_url, process_dir)
    result = engine.explain(ref, item_id, now=now)
    if as_json:
        print_json(result.to_json())
        return
    console = stdout_console()
    console.print(
        f"order {result.order_ref} ({result.process}) at {fmt_time(result.now)} UTC", markup=False
    )
    for item in result.items:
        data = item.to_json()
        head = Text(f"\nitem {item.item_id} ({item.sku}) in {item.state!r} since "
                    f"{fmt_time(item.since)} ({data['in_state_for']}): ")
        head.append(item.status, style=_STATUS_STYLE.get(item.status, ""))
        console.print(head)
        if item.transitions:
            console.print("  transitions out:", markup=False)
            for t in item.transitions:
                console.print(Text("    " + _describe_transition(t)))
        if item.reasons:
            console.print("  why it is not moving:" if item.status != "final" else "  state:",
                          markup=False)
            for reason in item.reasons:
                console.print(Text(f"    - {reason.message}"))


def _describe_transition(t: Any) -> str:
    how = ", ".join(t.kinds) or "event"
    text = f"→ {t.target}: "
    text += f"{t.event!r} ({how}" if t.event else f"({how}"
    if t.timeout:
        text += f" after {t.timeout}"
    text += ")"
    if t.command:
        text += f", command {t.command}"
    if t.condition:
        text += f", if {t.condition}"
        check = t.last_check
        if check is None:
            text += " [not asked yet]"
        else:
            answer = "true" if check.result else "false"
            text += f" [last: {answer} at {fmt_time(check.evaluated_at)}]"
    return text
