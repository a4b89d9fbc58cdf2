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
    stderr_console,
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
    for name in ("level", "process", "state", "limits", "items", "breach", "warn", "oldest",
                 "waited"):
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
            f"{oldest['order_ref']} item {oldest['item_id']}",
            oldest["waited"],
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
        if item.arrival is not None:
            console.print(Text(f"  {item.arrival.describe()}"))
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


# -- event --from-csv -------------------------------------------------------------------------
BULK_FAILED_EXIT_CODE = 1
"""``event --from-csv`` exits with this when any row was refused or failed."""


def bulk_event(
    db_url: str | None,
    process_dir: Path | None,
    event_name: str,
    ref: str | None,
    item_ids: tuple[int, ...],
    csv_file: Path | None,
    dry_run: bool,
    concurrency: int | None,
    as_json: bool,
) -> int:
    """``ratepay-oms event EVENT --from-csv FILE [--dry-run] [--json] [--concurrency K]``."""
    from ratepay_oms.console.bulk import DEFAULT_CONCURRENCY, read_event_rows, run_bulk_event

    if csv_file is None:
        raise click.UsageError("--dry-run, --json and --concurrency go with --from-csv FILE")
    if ref is not None or item_ids:
        raise click.UsageError("give either REF [--item ID] or --from-csv FILE, not both")
    rows = read_event_rows(csv_file)
    engine = engine_from_options(db_url, process_dir)
    report = run_bulk_event(
        engine, event_name, rows, dry_run=dry_run,
        concurrency=concurrency or DEFAULT_CONCURRENCY,
    )
    code = 0 if report.ok else BULK_FAILED_EXIT_CODE
    if as_json:
        print_json(report.to_json())
        return code
    table = Table(title=f"{event_name} from {csv_file}" + (" (dry run)" if dry_run else ""),
                  title_justify="left")
    for name in ("line", "order", "item", "status", "detail"):
        table.add_column(name, justify="right" if name in ("line", "item") else "left")
    styles = {"accepted": "green", "would fire": "cyan", "refused": "red", "failed": "bold red"}
    for row in report.rows:
        table.add_row(
            str(row.line),
            Text(row.order_ref),
            "" if row.item_id is None else str(row.item_id),
            Text(row.status, style=styles.get(row.status, "")),
            Text(_row_detail(row)),
        )
    console = stdout_console()
    console.print(table)
    counts = report.counts()
    shown = [f"{n} {k}" for k, n in counts.items() if n] or ["no rows"]
    console.print(f"{event_name}: {', '.join(shown)} in {report.duration_s:.2f} s"
                  + (" (dry run: nothing written)" if dry_run else ""), markup=False)
    if not report.ok:
        stderr_console().print(
            f"error: {counts['refused'] + counts['failed']} of {len(report.rows)} rows were "
            "refused or failed (see the table); fix them and run the file again "
            "(accepted rows will be refused as already moved)",
            markup=False,
        )
    return code


def _row_detail(row: Any) -> str:
    if row.status == "would fire":
        parts = []
        for w in row.would:
            targets = " | ".join(
                t["to"] + (f" if {t['if']}" if t["if"] else "") for t in w["targets"]
            )
            command = f" via {w['command']}" if w["command"] else ""
            parts.append(f"item {w['item_id']}: {w['from']} → {targets}{command}")
        return "; ".join(parts)
    if row.status == "accepted":
        paths: dict[int, list[str]] = {}
        for item_id, source, target in row.moved:  # the cascade, in order: one path per item
            path = paths.setdefault(item_id, [source])
            if path[-1] != source:
                path.append(source)
            path.append(target)
        moves = [f"item {i}: {' → '.join(p)}" for i, p in paths.items()]
        moves += [f"item {i}: stayed" for i in row.stayed if i not in paths]
        return "; ".join(moves) or (row.reason or "")
    return row.reason or ""
