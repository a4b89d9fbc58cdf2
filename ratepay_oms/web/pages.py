"""The pages people read: the orders list, one order, a gateway call's XML, the matrix and a
process drawing. Reads only: the engine's public queries, the console's read functions
(``order_detail``, ``api_calls``, ``build_matrix``) and our own paging queries."""

from __future__ import annotations

import json
import logging
import os
from datetime import date
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ratepay_oms.console.apilog import api_calls
from ratepay_oms.console.inspect import OrderNotFound, order_detail
from ratepay_oms.console.matrix import build_matrix
from ratepay_oms.engine.errors import OrderNotFoundError
from ratepay_oms.web import actions
from ratepay_oms.web.base import BIG_ORDER, GATEWAY_CALLS, SECRET_ENV, Console, url
from ratepay_oms.web.drawing import process_svg
from ratepay_oms.web.explain import explain_order
from ratepay_oms.web.queries import (
    HistoryRow,
    OrderSearch,
    accepted_events,
    group_items,
    history,
    order_id_of,
    search_orders,
)
from ratepay_oms.web.users import LoginSession

log = logging.getLogger(__name__)


def _date(value: str | None, name: str, problems: list[str]) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        problems.append(f"{name}: {value!r} is not a date (YYYY-MM-DD); ignored")
        return None


def parse_int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


async def orders(console: Console, request: Request, login: LoginSession) -> Response:
    q = request.query_params
    problems: list[str] = []
    search = OrderSearch(
        ref=q.get("ref", "").strip(), state=q.get("state", "").strip(),
        process=q.get("process", "").strip(),
        date_from=_date(q.get("from"), "from", problems),
        date_to=_date(q.get("to"), "to", problems),
    )

    def read() -> Any:
        with console.engine.session() as session:
            return search_orders(
                session, search, before=parse_int(q.get("before")), after=parse_int(q.get("after"))
            )

    page = await run_in_threadpool(read)
    flashes = await console.flashes(login)
    return console.render(
        request, "orders.html", login=login, page=page, search=search, problems=problems,
        processes=sorted(console.engine.definitions()), flashes=flashes,
    )


def _order_context(console: Console, ref: str) -> dict[str, Any]:
    engine = console.engine
    definitions = engine.definitions()
    detail = order_detail(engine, ref, definitions=definitions, calls=GATEWAY_CALLS)
    waiting = {i: intent["id"] for intent in detail["intents"] for i in intent["item_ids"]}
    items = [{**item, "intent_id": waiting.get(item["id"])} for item in detail["items"]]
    detail["items"] = items
    explained = None
    if hasattr(engine, "explain"):  # issue 13's Engine.explain, when it is there
        try:
            result = engine.explain(ref)
            explained = json.dumps(
                result.to_json() if hasattr(result, "to_json") else _jsonable(result),
                indent=2, ensure_ascii=False, default=str,
            )
        except Exception:  # the page must not die of an explain bug; our own view stays
            log.exception("Engine.explain failed for %s", ref)
    with engine.session() as session:
        order_id = order_id_of(session, ref)
        rows, total = history(session, order_id) if order_id is not None else ([], 0)
        done = actions.for_order(session, order_id) if order_id is not None else []
    rows = _merge(rows, [
        HistoryRow(
            at=action.created_at, item_id=None, sku=None, from_state=None, to_state=None,
            event=action.event, user=action.user_name,
            text=_action_text(action), outcome=action.outcome,
        )
        for action in done
    ])
    drawings = []
    for process in sorted({i["process"] for i in items}):
        definition = definitions.get(process)
        if definition is None:
            continue
        counts: dict[str, int] = {}
        for item in items:
            if item["process"] == process:
                counts[item["state"]] = counts.get(item["state"], 0) + 1
        svg, mermaid = process_svg(definition, counts)
        drawings.append({"process": process, "svg": svg, "mermaid": mermaid})
    return {
        "order": detail,
        "items": items,
        "big": len(items) > BIG_ORDER,
        "groups": group_items(items),
        "events": accepted_events(items),
        "event_data": console.event_data,
        "reasons": explain_order(detail, definitions),
        "explained": explained,
        "history": rows,
        "history_total": total,
        "drawings": drawings,
    }


def _merge(history_rows: list[HistoryRow], done: list[HistoryRow]) -> list[HistoryRow]:
    """The engine's history in its own order, each operator action placed after the last
    state change that happened before it (history times can be set by callers; their order
    is the engine's, not the clock's)."""
    merged: list[HistoryRow] = []
    pending = list(done)
    for row in history_rows:
        while pending and pending[0].at < row.at:
            merged.append(pending.pop(0))
        merged.append(row)
    return merged + pending


def _jsonable(value: Any) -> Any:
    from ratepay_oms.cli._common import jsonable

    return jsonable(value)


def _action_text(action: actions.Action) -> str:
    what = f"'{action.event}'" if action.event else action.action
    items = f" on items {', '.join(map(str, action.item_ids))}" if action.item_ids else ""
    detail = ""
    if action.detail:
        detail = " (" + ", ".join(f"{k}: {v}" for k, v in action.detail.items()) + ")"
    return f"{action.action} {what}{items}{detail}: {action.outcome}" + (
        f" — {action.message}" if action.message else ""
    )


async def order_page(console: Console, request: Request, login: LoginSession) -> Response:
    ref = request.path_params["ref"]
    try:
        context = await run_in_threadpool(_order_context, console, ref)
    except (OrderNotFound, OrderNotFoundError):
        return console.refuse(request, 404, f"No order {ref!r}.", login)
    flashes = await console.flashes(login)
    return console.render(request, "order.html", login=login, flashes=flashes, **context)


async def gateway_call(console: Console, request: Request, login: LoginSession) -> Response:
    ref = request.path_params["ref"]
    call_id = int(request.path_params["call_id"])

    def read() -> Any:
        calls = api_calls(console.engine, order_ref=ref, limit=None,
                          secret=os.environ.get(SECRET_ENV))
        return next((c for c in calls if c.id == call_id), None)

    call = await run_in_threadpool(read)
    if call is None:
        return console.refuse(request, 404, f"No gateway call {call_id} for order {ref!r}.", login)
    return console.render(request, "call.html", login=login, call=call, ref=ref)


async def matrix(console: Console, request: Request, login: LoginSession) -> Response:
    result = await run_in_threadpool(
        lambda: build_matrix(console.engine, definitions=console.engine.definitions())
    )
    return console.render(request, "matrix.html", login=login, matrix=result)


async def process_page(console: Console, request: Request, login: LoginSession) -> Response:
    name = request.path_params["name"]
    definition = console.engine.definitions().get(name)
    if definition is None:
        return console.refuse(request, 404, f"No process {name!r}.", login)
    svg, mermaid = await run_in_threadpool(process_svg, definition, {})
    return console.render(request, "process.html", login=login, name=name, svg=svg,
                          mermaid=mermaid)


async def home(console: Console, request: Request, login: LoginSession) -> Response:
    return RedirectResponse(url(request, "orders"), 303)
