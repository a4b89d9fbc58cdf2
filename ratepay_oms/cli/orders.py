"""``ratepay-oms order …`` and ``ratepay-oms event``: place orders, look at them, move them by hand.

Thin over :class:`~ratepay_oms.Engine`: the engine checks the input and refuses what is wrong
(unknown process, duplicate order ref, an event that is not manual, an item in the wrong state)
with an ``OmsError``; ``main()`` prints that as one line and nothing is written.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    any_call_failed,
    call_json,
    describe_call,
    engine_from_options,
    engine_options,
    fmt_time,
    gateway_calls,
    print_json,
    stdout_console,
    translate_db_errors,
)
from ratepay_oms.errors import ExitCode, OmsError

log = logging.getLogger(__name__)


class EventCommandFailedError(OmsError):
    """The event's command raised: its items stayed where they were and a retry is scheduled
    (the engine logged it); the console reports it and exits with ``GATEWAY_FAILED``."""

    exit_code = ExitCode.GATEWAY_FAILED


def _print_calls(calls: list[Any]) -> None:
    for call in calls:
        click.echo(describe_call(call))


@cli.group()
def order() -> None:
    """Place orders and look at their items, states and history.

    \b
    Example:
      ratepay-oms order place order.json
      ratepay-oms order show 100045
      ratepay-oms order history 100045 --json
    """


def _item_retry(item: Any) -> str:
    """The retry/error column: what the tick will do next for an item that failed."""
    parts = []
    if getattr(item, "retry_at", None) is not None:
        attempts = getattr(item, "attempts", 0)
        parts.append(f"retry {fmt_time(item.retry_at)} (attempt {attempts})")
    if getattr(item, "last_error", None):
        parts.append(str(item.last_error))
    return "; ".join(parts)


def _items_table(view: Any, *, detailed: bool) -> Table:
    table = Table()
    table.add_column("id", justify="right")
    table.add_column("sku")
    if detailed:
        table.add_column("name")
    table.add_column("state")
    if detailed:
        table.add_column("since")
        table.add_column("retry/error")
    for item in view.items:
        row = [str(item.id), item.sku]
        if detailed:
            row.append(item.name)
        row.append(item.state)
        if detailed:
            row += [fmt_time(item.state_entered_at), _item_retry(item)]
        table.add_row(*row)
    return table


def _table_limit() -> int:
    """``ITEMS_TABLE_LIMIT``, read when used (a test may lower it)."""
    from ratepay_oms.console import inspect

    return inspect.ITEMS_TABLE_LIMIT


def _summary_table(rows: list[dict[str, Any]], total: int) -> Table:
    """``item_summary`` rows as the table a big order gets instead of one row per item."""
    table = Table(title=f"{total} items by SKU and state (--items: every item)",
                  title_justify="left")
    for name in ("sku", "name", "state", "items", "amount", "retry/error"):
        table.add_column(name, justify="right" if name in ("items", "amount") else "left")
    for row in rows:
        error = ""
        if row["with_error"]:
            error = f"{row['with_error']} item(s), e.g. item {row['first_item']}: {row['error']}"
        table.add_row(row["sku"], row["name"] or "", row["state"], str(row["items"]),
                      row["amount"], Text(error, style="red") if error else "")
    return table


def _plain_items(view: Any) -> None:
    """Every item as fixed-width text: Rich lays out a table of 10,000 rows in seconds, this
    writes it in milliseconds (same columns as the detailed table)."""
    header = ("id", "sku", "name", "state", "since", "retry/error")
    rows = [
        (str(i.id), i.sku, i.name, i.state, fmt_time(i.state_entered_at), _item_retry(i))
        for i in view.items
    ]
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) for c in range(len(header) - 1)]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].rjust(widths[0])
        middle = [cell.ljust(width) for cell, width in zip(cells[1:-1], widths[1:], strict=True)]
        return "  ".join([first, *middle, cells[-1]]).rstrip()

    click.echo("\n".join([line(header), *(line(r) for r in rows)]))


def _print_items(view: Any, *, detailed: bool, every: bool = False) -> None:
    """The items of ``view``: a table up to ``ITEMS_TABLE_LIMIT`` items, else a summary by
    SKU and state (``every``: all of them, as plain text when there are that many)."""
    from ratepay_oms.console.inspect import item_summary

    limit = _table_limit()
    if len(view.items) <= limit:
        stdout_console().print(_items_table(view, detailed=detailed))
    elif every:
        _plain_items(view)
    else:
        rows = item_summary(i.to_json() for i in view.items)
        stdout_console().print(_summary_table(rows, len(view.items)))


@order.command("place")
@engine_options
@click.argument("file", metavar="FILE|-", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--no-fire", is_flag=True,
              help="Only store the order; the next tick runs the initial state's events.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the order and the gateway calls as one JSON document.")
@translate_db_errors
def place(
    db_url: str | None, process_dir: Path | None, file: str, no_fire: bool, as_json: bool
) -> None:
    """Place the order in FILE (JSON; - reads stdin) and start its process.

    The file is checked completely first (a JSON syntax error names line and column, a wrong
    field is named); an order ref that exists already is refused. Nothing is written on error.
    Prints the items and the outcome of every gateway call made (result and reason); exit
    status 4 when a call failed or was refused or a command failed (the items wait where the
    next tick retries or a person decides).

    \b
    Example:
      ratepay-oms order place order.json
      ratepay-oms order place - --json < order.json
      ratepay-oms order place order.json --no-fire --db sqlite:///oms.sqlite
    """
    from ratepay_oms.orders import load_order_file, load_order_text

    if file == "-":
        order_input = load_order_text(click.get_text_stream("stdin").read(), "<stdin>")
    else:
        order_input = load_order_file(file)
    engine = engine_from_options(db_url, process_dir)
    view = engine.place_order(order_input, fire=not no_fire)
    calls = gateway_calls(engine)
    item_errors = [i for i in view.items if getattr(i, "last_error", None)]
    if as_json:
        print_json({"order": view.to_json(), "gateway_calls": [call_json(c) for c in calls]})
    else:
        click.echo(f"placed order {view.order_ref} ({view.process}): {len(view.items)} items")
        _print_items(view, detailed=bool(item_errors))
        _print_calls(calls)
    if any_call_failed(calls) or item_errors:
        raise click.exceptions.Exit(ExitCode.GATEWAY_FAILED)


@order.command("show")
@engine_options
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True,
              help="Print the order as JSON on stdout (every item, however many).")
@click.option("--items", "every_item", is_flag=True,
              help="One row per item even for a big order (more than 100 items).")
@click.option("--summary", is_flag=True,
              help="Items by SKU and state even for a small order.")
@translate_db_errors
def show(
    db_url: str | None,
    process_dir: Path | None,
    ref: str,
    as_json: bool,
    every_item: bool,
    summary: bool,
) -> None:
    """Show order REF: items (state, since when, retry or error), payment, amounts delivered,
    cancelled and returned, pending timeouts and retries, and the last gateway calls.

    An order of more than 100 items shows its items by SKU and state (how many, their
    amount, how many wait for a retry or carry an error); --items lists every item.

    \b
    Example:
      ratepay-oms order show 100045
      ratepay-oms order show 100045 --items
      ratepay-oms order show 100045 --json | jq '.items[].state'
    """
    from ratepay_oms.cli.console import print_order_detail
    from ratepay_oms.console.inspect import item_summary, merge_order_json, order_detail

    if every_item and summary:
        raise click.UsageError("--items and --summary exclude each other")
    engine = engine_from_options(db_url, process_dir, gateway=False)
    if as_json:
        view = _with_gateway_reasons(engine, engine.order(ref))
        document = merge_order_json(view.to_json(), order_detail(engine, ref))
        if len(document["items"]) > _table_limit():
            _print_big_json(document)
        else:
            print_json(document)
        return
    detail = order_detail(engine, ref)
    items = detail["items"]
    click.echo(f"order {detail['order_ref']} ({detail['process']}, {detail['currency']}), "
               f"placed {fmt_time(_parse_time(detail['created_at']))}")
    if summary or (len(items) > _table_limit() and not every_item):
        _with_summary_reasons(engine, items)
        stdout_console().print(_summary_table(item_summary(items), len(items)))
    else:
        view = _with_gateway_reasons(engine, engine.order(ref))
        _print_items(view, detailed=True, every=True)
    print_order_detail(detail)


def _print_big_json(document: dict[str, Any]) -> None:
    """``print_json`` of a big order's document with one element per line in its long lists
    (items, timeouts, retries): the same JSON value, but those elements written by the C
    encoder (an indented dump goes through the pure-Python one: seconds for 10,000 items),
    and the whole thing still easy to read and to grep."""
    import json

    from ratepay_oms.cli._common import jsonable

    limit = _table_limit()
    long = {key for key, value in document.items() if isinstance(value, list)
            and len(value) > limit}
    markers = {key: f"\u0000{key}\u0000" for key in long}
    text = json.dumps(jsonable({**document, **markers}), indent=2, ensure_ascii=False)
    for key in long:
        lines = ",\n".join(
            "    " + json.dumps(element, ensure_ascii=False, default=jsonable)
            for element in document[key]
        )
        text = text.replace(json.dumps(markers[key]), "[\n" + lines + "\n  ]", 1)
    click.echo(text)


def _parse_time(text: str | None) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(text) if text else None


def _with_summary_reasons(engine: Any, items: list[dict[str, Any]]) -> None:
    """Like ``_with_gateway_reasons`` for the summary: the gateway's refusal of one item per
    (SKU, state) group left in an ``… invalid`` state (the group shows one example)."""
    from ratepay_oms.console.refusals import gateway_reasons, refusal_kind

    first: dict[tuple[str, str], dict[str, Any]] = {}
    for item in items:
        if refusal_kind(item["state"]) == "invalid" and not item["last_error"]:
            first.setdefault((item["sku"], item["state"]), item)
    if not first:
        return
    with engine.session() as session:
        reasons = gateway_reasons(session, [i["id"] for i in first.values()])
    for item in first.values():
        if item["id"] in reasons:
            item["last_error"] = reasons[item["id"]]


def _with_gateway_reasons(engine: Any, view: Any) -> Any:
    """The view with ``last_error`` holding the gateway's refusal (result, reason, text) for
    each item a command left in an ``… invalid`` state without an error of its own."""
    import dataclasses

    from ratepay_oms.console.refusals import gateway_reasons, refusal_kind

    refused = [i.id for i in view.items if refusal_kind(i.state) == "invalid" and not i.last_error]
    if not refused:
        return view
    with engine.session() as session:
        reasons = gateway_reasons(session, refused)
    items = tuple(
        dataclasses.replace(i, last_error=reasons[i.id]) if i.id in reasons else i
        for i in view.items
    )
    return dataclasses.replace(view, items=items)


@order.command("list")
@engine_options
@click.option("--state", default=None, help="Only orders with an item in this state.")
@click.option("--process", "process_name", default=None, help="Only orders of this process.")
@click.option("--json", "as_json", is_flag=True, help="Print the orders as a JSON list.")
@translate_db_errors
def list_orders(
    db_url: str | None,
    process_dir: Path | None,
    state: str | None,
    process_name: str | None,
    as_json: bool,
) -> None:
    """List orders with how many items are in which state.

    \b
    Example:
      ratepay-oms order list
      ratepay-oms order list --state "payment pending" --process RatepayInvoice01 --json
    """
    engine = engine_from_options(db_url, process_dir, gateway=False)
    views = engine.orders(state=state, process=process_name)
    if as_json:
        print_json([v.to_json() for v in views])
        return
    table = Table(caption=f"orders: {len(views)}", caption_justify="left")
    for name in ("order", "process", "created", "items", "states"):
        table.add_column(name, justify="right" if name == "items" else "left")
    for v in views:
        counts = Counter(i.state for i in v.items)
        states = ", ".join(f"{s} ×{n}" if n > 1 else s for s, n in sorted(counts.items()))
        table.add_row(v.order_ref, v.process, fmt_time(v.created_at), str(len(v.items)), states)
    stdout_console().print(table)


@order.command("history")
@engine_options
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the history as a JSON list.")
@translate_db_errors
def history(db_url: str | None, process_dir: Path | None, ref: str, as_json: bool) -> None:
    """Show every state change of the items of order REF, oldest first.

    \b
    Example:
      ratepay-oms order history 100045
      ratepay-oms order history 100045 --json
    """
    engine = engine_from_options(db_url, process_dir, gateway=False)
    entries = engine.history(ref)
    if as_json:
        print_json([e.to_json() for e in entries])
        return
    table = Table()
    for name in ("time", "item", "sku", "from → to", "event", "data"):
        table.add_column(name, justify="right" if name == "item" else "left")
    for e in entries:
        move = f"{e.from_state or '∅'} → {e.to_state}"
        data = ", ".join(f"{k}={v}" for k, v in sorted(e.data.items())) if e.data else ""
        if e.forced:
            # A person's decision, not the process: it must stand out (see `order move`).
            what = Text(f"FORCED by {e.actor}: {e.reason}", style="bold magenta")
            table.add_row(fmt_time(e.created_at), str(e.item_id), e.sku, move, what, data)
        else:
            table.add_row(
                fmt_time(e.created_at), str(e.item_id), e.sku, move, e.event or "", data
            )
    stdout_console().print(table)
    _print_adjustments(engine, ref)


def _print_adjustments(engine: Any, ref: str) -> None:
    """Credits and debits are no state change, so they are listed under the moves."""
    from ratepay_oms.console.inspect import order_detail

    detail = order_detail(engine, ref, calls=0)
    for a in detail.get("adjustments", []):
        when = (a["settled_at"] or a["created_at"] or "").replace("T", " ")[:19]
        click.echo(
            f"{when}  {a['kind']} {a['amount']} {detail.get('currency') or ''}"
            f" ({a['reason'] or 'no reason given'}): {a['status']}"
        )


@cli.command("event")
@engine_options
@click.argument("event_name", metavar="EVENT")
@click.argument("ref", required=False)
@click.option("--item", "item_ids", type=int, multiple=True, metavar="ID",
              help="Only this item (repeat for several); default: every item that accepts EVENT.")
@click.option("--from-csv", "csv_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, metavar="FILE",
              help="Fire EVENT for every row of FILE: order_ref[,item_id][,data columns…].")
@click.option("--dry-run", is_flag=True, help="With --from-csv: check and report, write nothing.")
@click.option("--concurrency", type=click.IntRange(min=1), default=None, metavar="K",
              help="With --from-csv: orders fired at once (default 4).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document: the moves, errors and gateway calls; with --from-csv the "
              "report.")
@click.option("--invoice-id", default=None, metavar="ID",
              help="Your invoice number, sent to RatePAY with the delivery (ship).")
@click.option("--tracking-id", "tracking_ids", multiple=True, metavar="CODE",
              help="A parcel's tracking code (repeat for several parcels); needs --carrier.")
@click.option("--carrier", default=None, metavar="NAME",
              help="DHL, DPD, GLS, HLG, HVS, OTH, TNT or UPS.")
@click.option("--data", "pairs", multiple=True, metavar="KEY=VALUE",
              help="More event data (invoice_date, delivery_date, due_date, …); repeatable.")
@translate_db_errors
def event(
    db_url: str | None,
    process_dir: Path | None,
    event_name: str,
    ref: str | None,
    item_ids: tuple[int, ...],
    csv_file: Path | None,
    dry_run: bool,
    concurrency: int | None,
    as_json: bool,
    invoice_id: str | None,
    tracking_ids: tuple[str, ...],
    carrier: str | None,
    pairs: tuple[str, ...],
) -> int | None:
    """Fire the manual EVENT on order REF (e.g. ship, cancel, refund), or on every order of a
    CSV file (--from-csv).

    Only events marked manual in the process can be fired by hand; a refusal says which item
    is in which state and what it accepts. Prints what moved and the outcome of every gateway
    call made (result and reason); exit status 4 when a call failed or was refused or a command
    failed (its items stay in place with a retry scheduled). With --from-csv every
    row is checked and reported (accepted, refused and why, failed); --dry-run says what would
    happen and writes nothing; the exit status is 1 when any row was refused or failed.

    \b
    Data given with the event (invoice id, tracking ids, carrier, --data pairs) is checked
    first, stored with the history rows of the move and sent with the delivery confirmation.

    \b
    Example:
      ratepay-oms event ship 100045
      ratepay-oms event ship 100045 --invoice-id INV-1 --tracking-id 00340434 --carrier DHL
      ratepay-oms event cancel 100045 --item 3 --item 4
      ratepay-oms event ship --from-csv shipments.csv --dry-run
    """
    if csv_file is not None or dry_run or concurrency is not None:
        from ratepay_oms.cli.operator import bulk_event

        return bulk_event(db_url, process_dir, event_name, ref, item_ids, csv_file, dry_run,
                          concurrency, as_json)
    if ref is None:
        raise click.UsageError("give the order REF, or --from-csv FILE")
    data = _event_data(invoice_id, tracking_ids, carrier, pairs)
    engine = engine_from_options(db_url, process_dir)
    result = engine.trigger(event_name, ref, list(item_ids) or None, data=data)
    calls = gateway_calls(engine)
    if as_json:
        print_json({
            "order_ref": ref,
            "event": event_name,
            "moved": [{"item_id": i, "from_state": s, "to_state": t} for i, s, t in result.moved],
            "stayed": list(result.stayed),
            "held": [{"item_id": i, "why": why} for i, why in result.held],
            "errors": list(result.errors),
            "gateway_calls": [call_json(c) for c in calls],
        })
        if result.errors or any_call_failed(calls):
            raise click.exceptions.Exit(ExitCode.GATEWAY_FAILED)
        return None
    _print_moves(result)
    _print_held(result.held)
    if not result.moved and not result.stayed and not result.errors and not result.held:
        click.echo("nothing moved")
    _print_calls(calls)
    if result.errors:
        # An OmsError (not click's Exit, which main() would turn into status 0): main prints it.
        raise EventCommandFailedError(
            "; ".join(result.errors) + f" (see `ratepay-oms order show {ref}`)"
        )
    if any_call_failed(calls):
        raise click.exceptions.Exit(ExitCode.GATEWAY_FAILED)
    return None


def _print_moves(result: Any) -> None:
    """One line per moved item; for more than ``ITEMS_TABLE_LIMIT`` moves, one line per
    (from, to) with the number of items (a big order's ship moves every unit twice)."""
    limit = _table_limit()
    if len(result.moved) <= limit:
        for item_id, source, target in result.moved:
            click.echo(f"item {item_id}: {source} → {target}")
    else:
        moves = Counter((source, target) for _, source, target in result.moved)
        for (source, target), count in moves.items():
            click.echo(f"{count} items: {source} → {target}")
    if len(result.stayed) <= limit:
        for item_id in result.stayed:
            click.echo(f"item {item_id}: stayed in its state (no transition applied)")
    else:
        click.echo(f"{len(result.stayed)} items stayed in their state (no transition applied)")


def _print_held(held: list[tuple[int, str]]) -> None:
    """Items accepted but waiting: one line per reason (they share it, being one group)."""
    by_reason: dict[str, list[int]] = {}
    for item_id, why in held:
        by_reason.setdefault(why, []).append(item_id)
    for why, ids in by_reason.items():
        label = f"item {ids[0]}" if len(ids) == 1 else f"{len(ids)} items"
        click.echo(f"{label}: {why}")


def _event_data(
    invoice_id: str | None,
    tracking_ids: tuple[str, ...],
    carrier: str | None,
    pairs: tuple[str, ...],
) -> dict[str, Any] | None:
    """The event's data from the options, checked before anything is touched."""
    from ratepay_oms.plugins.ratepay.event_data import EventDataError, check_event_data

    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EventDataError(
                f"--data {pair!r}: write KEY=VALUE, e.g. --data due_date=2026-12-31"
            )
        data[key.strip()] = value.strip()
    if invoice_id is not None:
        data["invoice_id"] = invoice_id
    if tracking_ids:
        data["tracking_ids"] = list(tracking_ids)
    if carrier is not None:
        data["carrier"] = carrier
    return check_event_data(data) if data else None
