"""Operator commands: ``matrix``, ``log``, ``locks list|clear`` and ``process migrate``.

Thin over ``ratepay_oms.console``: each command opens the database named by ``--db`` (the same
resolution as every other command), calls one query function and prints a Rich table or, with
``--json``, one JSON document on stdout (shapes in ``docs/console.md``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import Session

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    check_database_url,
    database_errors,
    db_option,
    engine_options,
    fmt_time,
    print_json,
    require_existing_database,
    resolve_database_url,
    stderr_console,
    stdout_console,
)
from ratepay_oms.cli.tick import IsoTime
from ratepay_oms.errors import OmsError
from ratepay_oms.process.model import ProcessDefinition

log = logging.getLogger(__name__)

now_option = click.option(
    "--now",
    type=IsoTime(),
    default=None,
    help="Pretend it is this time (ISO 8601, UTC; default: now).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")


@contextmanager
def open_session(db_url: str | None) -> Iterator[Session]:
    """A session on the ``--db`` database, checked and with DB errors as one-line messages.

    The console reads the tables directly (no process files needed), so ``log`` and ``locks``
    work even when a process file is broken.
    """
    from ratepay_oms.persistence.db import create_db_engine, session_factory

    url = check_database_url(resolve_database_url(db_url))
    require_existing_database(url)
    engine = create_db_engine(url)
    try:
        with database_errors(url), session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def load_definitions(
    process_dir: Path | None, *, required: bool
) -> Mapping[str, ProcessDefinition]:
    """The process definitions of ``--processes`` (or the default folder).

    The matrix still works without them (``required=False``: a warning, then raw states);
    a migration does not.
    """
    from ratepay_oms.cli._common import current_config
    from ratepay_oms.process.loader import load_processes

    try:
        return load_processes(current_config().resolve_process_dir(process_dir))
    except OmsError as exc:
        if required:
            raise
        stderr_console().print(f"warning: process definitions not loaded: {exc}", markup=False)
        return {}


# -- matrix -----------------------------------------------------------------------------------
@cli.command("matrix")
@engine_options
@click.option("--process", "process_name", default=None, help="Only this process.")
@click.option("--all-states", is_flag=True, help="Also list the states that hold no items.")
@now_option
@json_option
def matrix(
    db_url: str | None,
    process_dir: Path | None,
    process_name: str | None,
    all_states: bool,
    now: datetime | None,
    as_json: bool,
) -> None:
    """Items per process and state, by how long they have been there (today, this week, older).

    The "!" column flags states holding items with an error or a pending retry, items the
    gateway refused ("… invalid"), states the process file no longer knows, and SLA breaches:
    those need a person. Declined states are labelled. The "sla" column counts items past the
    state's SLA limits (see `ratepay-oms alerts`).

    \b
    Example:
      ratepay-oms matrix
      ratepay-oms matrix --process RatepayInvoice01 --now 2024-08-01T00:00:00Z --json
    """
    from ratepay_oms.console.matrix import build_matrix

    definitions = load_definitions(process_dir, required=False)
    with open_session(db_url) as session:
        result = build_matrix(
            session,
            now=now,
            process=process_name,
            definitions=definitions,
            include_empty=all_states,
        )
    if as_json:
        print_json(result.to_json())
        return
    console = stdout_console()
    if not result.processes:
        console.print("no items", markup=False)
        return
    for row in result.processes:
        title = f"{row.process}: {row.total} items"
        if not row.loaded:
            title += " (process not loaded)"
        table = Table(title=title, title_justify="left")
        table.add_column("state")
        for name in ("today", "week", "older", "total", "errors", "retries"):
            table.add_column(name, justify="right")
        table.add_column("sla")
        table.add_column("!", justify="center")
        for cell in row.states:
            label = Text(cell.state)
            if cell.final:
                label.append(" (final, declined)" if cell.refusal == "declined" else " (final)",
                             style="dim")
            elif cell.refusal == "declined":
                label.append(" (declined)", style="yellow")
            if not cell.known:
                label.append(" (unknown state)", style="red")
            if cell.refusal == "invalid":
                label.append(" (refused by the gateway: retry or decide)", style="red")
            mark = Text("!", style="bold red") if cell.attention else Text("")
            table.add_row(
                label,
                str(cell.today),
                str(cell.week),
                str(cell.older),
                str(cell.total),
                _nonzero(cell.errors),
                _nonzero(cell.retries),
                _sla_mark(cell),
                mark,
                style="red" if cell.attention else None,
            )
        console.print(table)
    console.print(
        f"now {fmt_time(result.now)} UTC; today since {fmt_time(result.today_since)}, "
        f"week since {fmt_time(result.week_since)}",
        markup=False,
        style="dim",
    )


def _nonzero(value: int) -> str:
    return str(value) if value else ""


def _sla_mark(cell: Any) -> Text:
    """``breach 2`` (bold red) / ``warn 1`` (yellow): items past the state's SLA limits."""
    text = Text()
    if cell.sla_breach:
        text.append(f"breach {cell.sla_breach}", style="bold red")
    if cell.sla_warn:
        text.append(" " if text else "")
        text.append(f"warn {cell.sla_warn}", style="yellow")
    return text


# -- log --------------------------------------------------------------------------------------
@cli.command("log")
@db_option
@click.option("--order", "order_ref", default=None, metavar="REF", help="Only this order.")
@click.option(
    "--operation",
    default=None,
    metavar="OP",
    help="Only this operation, e.g. PAYMENT_REQUEST or PAYMENT_CHANGE/return.",
)
@click.option(
    "--errors",
    "errors_only",
    is_flag=True,
    help="Only failed calls (declined, error result, transport failure).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Newest N calls."
)
@click.option(
    "--xml",
    "with_xml",
    is_flag=True,
    help="Include the request and response XML (security code masked).",
)
@json_option
def api_log(
    db_url: str | None,
    order_ref: str | None,
    operation: str | None,
    errors_only: bool,
    limit: int,
    with_xml: bool,
    as_json: bool,
) -> None:
    """The RatePAY API log, newest first; the security code is always masked.

    \b
    Example:
      ratepay-oms log --order 100045
      ratepay-oms log --errors --operation CONFIRMATION_DELIVER --limit 20 --json
    """
    from ratepay_oms.console.apilog import api_calls

    secret = _configured_secret()
    with open_session(db_url) as session:
        calls = api_calls(
            session,
            order_ref=order_ref,
            operation=operation,
            errors_only=errors_only,
            limit=limit,
            secret=secret,
        )
    if as_json:
        print_json([c.to_json(with_xml=with_xml) for c in calls])
        return
    console = stdout_console()
    table = Table(title=f"{len(calls)} gateway call(s)", title_justify="left")
    for name in ("id", "time", "order", "operation", "result", "reason", "http", "ms", "error"):
        table.add_column(
            name, justify="right" if name in ("id", "http", "ms") else "left", overflow="fold"
        )
    for c in calls:
        result = " ".join(x for x in (c.result_code, c.result_text) if x)
        reason = " ".join(x for x in (c.reason_code, c.reason_text) if x)
        table.add_row(
            str(c.id),
            fmt_time(c.created_at),
            c.order_ref or "",
            c.operation_label,
            result,
            reason,
            str(c.http_status or ""),
            str(c.duration_ms or ""),
            c.error or "",
            style="red" if c.failed else None,
        )
    console.print(table)
    if with_xml:
        for c in calls:
            console.print(f"--- #{c.id} request", markup=False)
            console.print(c.request_xml or "", markup=False, highlight=False)
            console.print(f"--- #{c.id} response", markup=False)
            console.print(c.response_xml or "", markup=False, highlight=False)


def _configured_secret() -> str | None:
    """The configured security code, so a stray copy in any column is masked too."""
    import os

    return os.environ.get("RATEPAY_SECURITY_CODE") or None


# -- locks ------------------------------------------------------------------------------------
@cli.group("locks")
def locks() -> None:
    """Order leases held by tick workers (list, and clear the ones a crash left behind).

    \b
    Example:
      ratepay-oms locks list
      ratepay-oms locks clear
    """


@locks.command("list")
@db_option
@now_option
@json_option
def locks_list(db_url: str | None, now: datetime | None, as_json: bool) -> None:
    """List leased orders: which worker, until when, expired or not.

    \b
    Example:
      ratepay-oms locks list --json
    """
    from ratepay_oms.console.locks import list_leases

    with open_session(db_url) as session:
        leases = list_leases(session, now=now)
    if as_json:
        print_json([lease.to_json() for lease in leases])
        return
    table = Table(title=f"{len(leases)} leased order(s)", title_justify="left")
    for name in ("order", "process", "worker", "expires", "items", "expired"):
        table.add_column(name, justify="right" if name == "items" else "left")
    for lease in leases:
        table.add_row(
            lease.order_ref,
            lease.process,
            lease.claimed_by,
            fmt_time(lease.claim_expires_at),
            str(lease.items),
            "yes" if lease.expired else "",
            style="yellow" if lease.expired else None,
        )
    stdout_console().print(table)


@locks.command("clear")
@db_option
@click.option(
    "--expired-only/--force",
    "expired_only",
    default=True,
    help="Clear only expired leases (default), or every lease (--force).",
)
@now_option
@json_option
def locks_clear(
    db_url: str | None,
    expired_only: bool,
    now: datetime | None,
    as_json: bool,
) -> None:
    """Release order leases whose time ran out (Spryker's oms:clear-locks); run it daily.

    --force releases live leases too: only when the worker holding them is known to be dead,
    otherwise two workers may work on one order.

    \b
    Example:
      ratepay-oms locks clear
      ratepay-oms locks clear --force
    """
    from ratepay_oms.console.locks import clear_leases

    if not expired_only:
        stderr_console().print(
            "warning: --force clears leases of workers that may still be running; "
            "a by-order command could run twice",
            markup=False,
        )
    with open_session(db_url) as session:
        refs = clear_leases(session, now=now, force=not expired_only)
    if as_json:
        print_json({"cleared": refs, "forced": not expired_only})
        return
    stdout_console().print(
        f"cleared {len(refs)} lease(s)" + (": " + ", ".join(refs) if refs else ""), markup=False
    )


# -- process migrate --------------------------------------------------------------------------
def _process_group() -> click.Group:
    from ratepay_oms.cli import process as process_cli

    return process_cli.process_group


def _migrate_command() -> click.Command:
    @click.command("migrate")
    @engine_options
    @click.argument("from_process", metavar="FROM")
    @click.argument("to_process", metavar="TO")
    @click.option(
        "--map",
        "map_file",
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="YAML or JSON file {old state: new state}.",
    )
    @click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
    @now_option
    @json_option
    def migrate_process(
        db_url: str | None,
        process_dir: Path | None,
        from_process: str,
        to_process: str,
        map_file: Path,
        dry_run: bool,
        now: datetime | None,
        as_json: bool,
    ) -> None:
        """Move the running items of process FROM to process TO, state by state.

        Every state a running item of FROM is in must be mapped to a state of TO, or nothing
        changes. One transaction: new state, history and log rows (event "process
        migration"), timeouts of the new state re-armed from now, pending retries dropped.

        \b
        Example:
          ratepay-oms process migrate RatepayInvoice01 RatepayInvoice02 --map map.yaml --dry-run
          ratepay-oms process migrate RatepayInvoice01 RatepayInvoice02 --map map.yaml
        """
        from ratepay_oms.console.migrate import load_state_map, migrate, plan_as_text

        state_map = load_state_map(map_file)
        definitions = load_definitions(process_dir, required=True)
        with open_session(db_url) as session:
            plan = migrate(
                session, definitions, from_process, to_process, state_map, now=now, dry_run=dry_run
            )
        if as_json:
            print_json(plan.to_json() | {"dry_run": dry_run})
            return
        console = stdout_console()
        for line in plan_as_text(plan):
            console.print(line, markup=False)
        console.print("dry run: nothing changed" if dry_run else "migrated", markup=False)

    return migrate_process


def _attach_migrate() -> None:
    try:
        group = _process_group()
    except (ImportError, AttributeError):  # pragma: no cover - process CLI missing
        log.debug("process CLI not available; 'process migrate' not attached")
        return
    if "migrate" not in group.commands:
        group.add_command(_migrate_command())


_attach_migrate()


# -- order show (detail part) -----------------------------------------------------------------
def _next_summary(detail: Mapping[str, Any]) -> Table:
    """The "next" table of a big order: timeouts and retries grouped by what will happen and
    when (a 10,000-unit order arms the same timeout for every unit)."""
    groups: Counter[tuple[str, str, str, str, str]] = Counter()
    for t in detail["timeouts"]:
        groups[("timeout", t["state"], t["event"], t["due_at"],
                "overdue" if t["overdue"] else "")] += 1
    for r in detail["retries"]:
        note = f"attempt {r['attempts']}" + (f": {r['last_error']}" if r["last_error"] else "")
        groups[("retry", r["state"], r["event"] or "", r["retry_at"], note)] += 1
    table = Table(title="next", title_justify="left")
    for name in ("items", "kind", "state", "event", "due", "note"):
        table.add_column(name, justify="right" if name == "items" else "left")
    for (kind, state, event, due, note), count in groups.items():
        table.add_row(str(count), kind, state, event, due, note,
                      style="red" if kind == "retry" else None)
    return table


def print_order_detail(detail: Mapping[str, Any]) -> None:
    """The parts of ``order show`` below the items table: payment, amounts, what comes next,
    and the last gateway calls."""
    from ratepay_oms.console.inspect import ITEMS_TABLE_LIMIT

    console = stdout_console()
    pay = detail["payment"]
    amounts = detail["amounts"]
    currency = detail.get("currency") or ""
    console.print(
        "payment: "
        + ", ".join(
            f"{k} {pay[k]}"
            for k in (
                "method", "profile", "transaction_id", "short_id", "descriptor",
                "mandate_reference",
            )
            if pay.get(k)
        ),
        markup=False,
    )
    if pay.get("method_locked"):
        console.print(f"method locked: {pay['method_locked']}", style="red", markup=False)
    if pay.get("customer_message") and pay.get("result_code") in ("401", "150"):
        console.print(f"RatePAY to the customer: {pay['customer_message']}", markup=False)
    console.print(
        "amounts: "
        + ", ".join(
            f"{k} {amounts[k]} {currency}"
            for k in ("ordered", "delivered", "cancelled", "returned", "open")
        )
        + "".join(
            f", {k} {amounts[k]} {currency}"
            for k in ("credited", "debited")
            if amounts.get(k) and Decimal(amounts[k]) != 0
        ),
        markup=False,
    )
    for adj in detail.get("adjustments", []):
        console.print(
            f"{adj['kind']} {adj['amount']} {currency} ({adj['reason'] or 'no reason given'}): "
            f"{adj['status']}"
            + (f" — {adj['reason_code']} {adj['message']}" if adj["status"] == "refused" else ""),
            markup=False,
        )
    if detail.get("lease"):
        lease = detail["lease"]
        state = "expired" if lease["expired"] else "held"
        console.print(
            f"lease: {state} by {lease['claimed_by']} until {lease['claim_expires_at']}",
            markup=False,
        )
    for intent in detail.get("intents", []):
        console.print(
            f"waiting: intent {intent['id']} ({intent['status']}): {intent['explanation']}",
            style="red",
            markup=False,
        )
    if len(detail["timeouts"]) + len(detail["retries"]) > ITEMS_TABLE_LIMIT:
        console.print(_next_summary(detail))
    elif detail["timeouts"] or detail["retries"]:
        table = Table(title="next", title_justify="left")
        for name in ("item", "kind", "event", "due", "note"):
            table.add_column(name, justify="right" if name == "item" else "left")
        for t in detail["timeouts"]:
            table.add_row(
                str(t["item_id"]),
                "timeout",
                t["event"],
                t["due_at"],
                "overdue" if t["overdue"] else "",
            )
        for r in detail["retries"]:
            note = f"attempt {r['attempts']}" + (f": {r['last_error']}" if r["last_error"] else "")
            table.add_row(
                str(r["item_id"]), "retry", r["event"] or "", r["retry_at"], note, style="red"
            )
        console.print(table)
    if detail["gateway_calls"]:
        table = Table(title="last gateway calls", title_justify="left")
        for name in ("time", "operation", "result", "http", "error"):
            table.add_column(name)
        for c in detail["gateway_calls"]:
            op = c["operation"] + (f"/{c['subtype']}" if c["subtype"] else "")
            result = " ".join(x for x in (c["result_code"], c["result_text"]) if x)
            table.add_row(
                c["created_at"],
                op,
                result,
                str(c["http_status"] or ""),
                c["error"] or "",
                style="red" if c["failed"] else None,
            )
        console.print(table)
