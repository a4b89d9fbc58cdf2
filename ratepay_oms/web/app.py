"""The back-office web console as an ASGI app (Starlette, server-rendered Jinja2).

``create_app(engine)`` returns an app a shop mounts in its own backend
(``Mount("/oms", app=create_app(engine))``) or runs alone (``ratepay-oms web serve``). Every
page but the login needs a session; every POST needs the session's CSRF token (403 without);
viewers see, operators act. The app only calls the engine's public API (``trigger``,
``resolve_intent``, ``order``, ``intents``) and the console's read functions; everything it
writes itself is its users, sessions and operator log (``users``, ``actions``).

Order data is hostile: templates autoescape everything, the Content-Security-Policy allows no
inline script and nothing from another origin, and gateway XML is masked before it is shown.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import os
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ratepay_oms.console.apilog import api_calls, mask_text
from ratepay_oms.console.inspect import OrderNotFound, order_detail
from ratepay_oms.console.matrix import build_matrix
from ratepay_oms.engine.errors import ManualEventError, OrderLockedError, OrderNotFoundError
from ratepay_oms.errors import OmsError
from ratepay_oms.web import actions
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
from ratepay_oms.web.users import SESSION_HOURS, LoginSession, UserError, UserStore

log = logging.getLogger(__name__)

SESSION_COOKIE = "ratepay_oms_session"
LOGIN_CSRF_COOKIE = "ratepay_oms_login_csrf"
BIG_ORDER = 60
"""Orders with more items show a summary by SKU and state instead of one row per item."""
GATEWAY_CALLS = 20
SECRET_ENV = "RATEPAY_SECURITY_CODE"
BUSY = (
    "order {ref} is being worked on by another request (a double click?); nothing was done "
    "twice: reload the page to see where its items are now"
)

DEFAULT_EVENT_DATA: Mapping[str, Sequence[tuple[str, str]]] = {
    "ship": (("invoice_id", "Invoice id"), ("tracking_id", "Tracking id"), ("carrier", "Carrier")),
}
"""Event → the data fields its form offers (key, label); used when ``Engine.trigger`` takes
``data`` (issue 12). A shop passes its own mapping to ``create_app``."""

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}

Handler = Callable[[Request], Awaitable[Response]]


class _Console:
    """The app's state: the engine, its users, the templates, the settings."""

    def __init__(
        self,
        engine: Any,
        *,
        secure_cookies: bool | None,
        session_hours: int,
        event_data: Mapping[str, Sequence[tuple[str, str]]],
    ) -> None:
        self.engine = engine
        self.users = UserStore(engine.session)
        self.secure_cookies = secure_cookies
        self.session_hours = session_hours
        self.takes_data = "data" in inspect.signature(engine.trigger).parameters
        self.event_data = event_data if self.takes_data else {}
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self.templates = Environment(
            loader=PackageLoader("ratepay_oms.web", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )

    # -- responses --------------------------------------------------------------------------
    def render(
        self, request: Request, template: str, status: int = 200, **context: Any
    ) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        orders_path = _url(request, "orders")
        html = self.templates.get_template(template).render(
            request=request, root=root, url=functools.partial(_url, request),
            order_url=lambda ref: f"{orders_path}/{quote(ref, safe='')}", **context
        )
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def refuse(self, request: Request, status: int, message: str,
               login: LoginSession | None = None) -> HTMLResponse:
        return self.render(request, "error.html", status=status, message=message, login=login)

    async def flashes(self, login: LoginSession) -> list[dict[str, str]]:
        if not login.has_flash:
            return []
        return await run_in_threadpool(self.users.pop_flash, login.id)

    def secure(self, request: Request) -> bool:
        if self.secure_cookies is not None:
            return self.secure_cookies
        return request.url.scheme == "https"

    def cookie_path(self, request: Request) -> str:
        return (request.scope.get("root_path") or "") + "/"

    @contextmanager
    def working_on(self, ref: str) -> Iterator[bool]:
        """One action per order at a time in this process; yields False while another runs.

        The engine's lease keeps two *workers* apart, but every request here runs as the same
        worker (one ``Engine``), and a worker may take a lease it already holds: without this,
        two clicks at once could both fire. Across processes, each engine's own worker id and
        the lease do the job.
        """
        with self._busy_lock:
            if ref in self._busy:
                yield False
                return
            self._busy.add(ref)
        try:
            yield True
        finally:
            with self._busy_lock:
                self._busy.discard(ref)

    # -- who is asking -----------------------------------------------------------------------
    async def login_of(self, request: Request) -> LoginSession | None:
        token = request.cookies.get(SESSION_COOKIE)
        return await run_in_threadpool(self.users.session, token) if token else None

    def acting_engine(self, login: LoginSession) -> Any:
        """The engine, with the transition log's origin naming the user (``argv``): the
        engine's own history then says who fired the event, beside our operator log."""
        origin = getattr(self.engine, "origin", None)
        if origin is None:
            return self.engine
        acting = copy.copy(self.engine)
        acting.origin = type(origin)(
            hostname=origin.hostname,
            argv=f"ratepay-oms web: user {login.user.name} ({login.user.role})",
        )
        return acting


def _url(request: Request, name: str, /, query: Mapping[str, Any] | None = None,
         **path: Any) -> str:
    """The path of route ``name`` under wherever the app is mounted, plus a query string."""
    url = str(request.url_for(name, **{k: str(v) for k, v in path.items()}).path)
    if query:
        url += "?" + urlencode({k: v for k, v in query.items() if v not in (None, "")})
    return url


def _page(console: _Console, *, operator: bool = False, post: bool = False) -> Callable[
    [Callable[[_Console, Request, LoginSession], Awaitable[Response]]], Handler
]:
    """Wrap an endpoint: a login is required (GET: redirect to the login page), POSTs need the
    session's CSRF token (403), ``operator`` endpoints refuse viewers (403)."""

    def wrap(
        endpoint: Callable[[_Console, Request, LoginSession], Awaitable[Response]],
    ) -> Handler:
        @functools.wraps(endpoint)
        async def handler(request: Request) -> Response:
            login = await console.login_of(request)
            if post:
                form = await request.form()
                token = str(form.get("csrf_token") or "")
                if login is None or not secrets.compare_digest(
                    token.encode(), login.csrf_token.encode()
                ):
                    return console.refuse(
                        request, 403,
                        "Refused: this form carried no valid CSRF token. Reload the page and "
                        "try again.", login,
                    )
            elif login is None:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(
                    _url(request, "login", query={"next": target}), status_code=303
                )
            assert login is not None
            if operator and not login.user.can_act:
                return console.refuse(
                    request, 403,
                    f"Refused: {login.user.name} is a viewer; only operators fire events and "
                    "resolve intents.", login,
                )
            return await endpoint(console, request, login)

        return handler

    return wrap


# -- login / logout -------------------------------------------------------------------------
def _safe_next(request: Request, target: str | None) -> str:
    root = request.scope.get("root_path", "")
    if target and target.startswith((root or "") + "/") and not target.startswith("//") \
            and "\\" not in target:
        return target
    return _url(request, "orders")


async def login_page(console: _Console, request: Request, message: str | None = None,
                     status: int = 200) -> Response:
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    response = console.render(
        request, "login.html", status=status, csrf_token=token, message=message,
        next=_safe_next(request, request.query_params.get("next")), login=None,
    )
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, httponly=True, samesite="lax",
        secure=console.secure(request), path=console.cookie_path(request),
    )
    return response


async def login_post(console: _Console, request: Request) -> Response:
    form = await request.form()
    expected = request.cookies.get(LOGIN_CSRF_COOKIE) or ""
    token = str(form.get("csrf_token") or "")
    if not expected or not secrets.compare_digest(token.encode(), expected.encode()):
        return console.refuse(
            request, 403, "Refused: the login form carried no valid CSRF token. Reload the "
            "login page and try again."
        )
    name, password = str(form.get("username") or ""), str(form.get("password") or "")
    try:
        token, _user = await run_in_threadpool(
            console.users.login, name, password, hours=console.session_hours
        )
    except UserError as exc:
        return await login_page(console, request, message=str(exc), status=401)
    response = RedirectResponse(_safe_next(request, str(form.get("next") or "")), 303)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=console.session_hours * 3600, httponly=True,
        samesite="lax", secure=console.secure(request), path=console.cookie_path(request),
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=console.cookie_path(request))
    return response


async def logout(console: _Console, request: Request, login: LoginSession) -> Response:
    await run_in_threadpool(console.users.logout, request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse(_url(request, "login"), 303)
    response.delete_cookie(SESSION_COOKIE, path=console.cookie_path(request))
    return response


# -- pages ----------------------------------------------------------------------------------
def _date(value: str | None, name: str, problems: list[str]) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        problems.append(f"{name}: {value!r} is not a date (YYYY-MM-DD); ignored")
        return None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


async def orders(console: _Console, request: Request, login: LoginSession) -> Response:
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
                session, search, before=_int(q.get("before")), after=_int(q.get("after"))
            )

    page = await run_in_threadpool(read)
    flashes = await console.flashes(login)
    return console.render(
        request, "orders.html", login=login, page=page, search=search, problems=problems,
        processes=sorted(console.engine.definitions()), flashes=flashes,
    )


def _order_context(console: _Console, ref: str) -> dict[str, Any]:
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


async def order_page(console: _Console, request: Request, login: LoginSession) -> Response:
    ref = request.path_params["ref"]
    try:
        context = await run_in_threadpool(_order_context, console, ref)
    except (OrderNotFound, OrderNotFoundError):
        return console.refuse(request, 404, f"No order {ref!r}.", login)
    flashes = await console.flashes(login)
    return console.render(request, "order.html", login=login, flashes=flashes, **context)


def _chosen_items(console: _Console, ref: str, event: str, form: FormData) -> list[int] | None:
    """Item ids from the form: ticked items, plus "take N" of SKU/state groups (big orders);
    ``None`` when "every item that accepts it" was ticked."""
    if form.get("all") == "1":
        return None
    chosen = [int(v) for v in form.getlist("item_id") if str(v).isdigit()]
    takes = [
        (str(g), _int(str(n)) or 0)
        for g, n in zip(form.getlist("group"), form.getlist("take"), strict=False)
    ]
    if any(n > 0 for _, n in takes):
        view = console.engine.order(ref)
        definition = console.engine.definitions().get(view.process)
        free: dict[str, list[int]] = {}
        for item in view.items:
            accepts = definition is not None and event in definition.events_from(item.state)
            if item.intent_id is None and accepts and item.id not in chosen:
                free.setdefault(f"{item.sku}\x1f{item.state}", []).append(item.id)
        for key, n in takes:
            chosen.extend(free.get(key, [])[: max(n, 0)])
    return chosen


async def fire_event(console: _Console, request: Request, login: LoginSession) -> Response:
    ref = request.path_params["ref"]
    form = await request.form()
    event = str(form.get("event") or "")
    back = RedirectResponse(_url(request, "order", ref=ref), 303)
    order_id = await run_in_threadpool(_order_id, console, ref)
    if order_id is None:
        return console.refuse(request, 404, f"No order {ref!r}.", login)
    data = {
        key: str(form.get(f"data.{key}") or "").strip()
        for key, _label in console.event_data.get(event, ())
    }
    data = {k: v for k, v in data.items() if v}

    def fire() -> tuple[str, str, list[int] | None]:
        with console.working_on(ref) as free:
            if not free:
                return actions.REFUSED, BUSY.format(ref=ref), None
            return fire_now()

    def fire_now() -> tuple[str, str, list[int] | None]:
        item_ids = _chosen_items(console, ref, event, form)
        if item_ids == []:
            return actions.REFUSED, "choose at least one item (or tick every item)", item_ids
        kwargs: dict[str, Any] = {"data": data} if console.takes_data and data else {}
        try:
            result = console.acting_engine(login).trigger(event, ref, item_ids, **kwargs)
        except (ManualEventError, OrderLockedError) as exc:
            return actions.REFUSED, str(exc), item_ids
        except OmsError as exc:
            return actions.FAILED, str(exc), item_ids
        moved = len({item for item, _s, _t in result.moved})
        parts = [f"{moved} item{'s' if moved != 1 else ''} moved"]
        firsts: dict[int, tuple[str, str]] = {}
        for item, source, target in result.moved:
            firsts[item] = (firsts.get(item, (source, target))[0], target)
        if firsts:
            parts.append(", ".join(f"item {i}: {s} → {t}" for i, (s, t) in firsts.items()))
        if result.stayed:
            parts.append(f"stayed: {', '.join(map(str, result.stayed))}")
        if result.errors:
            parts.append("errors: " + "; ".join(mask_text(e) or "" for e in result.errors))
            return actions.FAILED, "; ".join(parts), item_ids
        return actions.DONE, "; ".join(parts), item_ids

    try:
        outcome, message, item_ids = await run_in_threadpool(fire)
    except Exception:
        log.exception("event %r on %s failed", event, ref)
        outcome, message, item_ids = actions.FAILED, "internal error (see the server log)", None
    await run_in_threadpool(
        functools.partial(
            actions.record, console.engine.session, user_name=login.user.name,
            order_id=order_id, action=actions.EVENT, event=event, item_ids=item_ids or [],
            detail=data, outcome=outcome, message=message,
        )
    )
    kind = {"done": "ok", "refused": "refused", "failed": "error"}[outcome]
    label = {"done": "done", "refused": "REFUSED", "failed": "FAILED"}[outcome]
    await run_in_threadpool(
        console.users.push_flash, login.id, kind, f"'{event}' {label}: {message}"
    )
    return back


def _order_id(console: _Console, ref: str) -> int | None:
    with console.engine.session() as session:
        return order_id_of(session, ref)


async def resolve_intent(console: _Console, request: Request, login: LoginSession) -> Response:
    ref = request.path_params["ref"]
    intent_id = int(request.path_params["intent_id"])
    form = await request.form()
    decision = str(form.get("decision") or "")
    note = str(form.get("note") or "").strip()
    order_id = await run_in_threadpool(_order_id, console, ref)
    if order_id is None:
        return console.refuse(request, 404, f"No order {ref!r}.", login)

    def resolve() -> tuple[str, str]:
        with console.working_on(ref) as free:
            return resolve_now() if free else (actions.REFUSED, BUSY.format(ref=ref))

    def resolve_now() -> tuple[str, str]:
        if decision not in ("booked", "not booked"):
            return actions.REFUSED, "choose booked or not booked"
        if not note:
            return actions.REFUSED, "say in a note what you checked at RatePAY"
        owned = [i.id for i in console.engine.intents(ref, open_only=False)]
        if intent_id not in owned:
            return actions.REFUSED, f"intent {intent_id} is not an intent of order {ref}"
        try:
            result = console.acting_engine(login).resolve_intent(
                intent_id, booked=decision == "booked",
                note=f"{note} ({login.user.name}, web console)",
            )
        except OmsError as exc:
            return actions.REFUSED, str(exc)
        moved = len({item for item, _s, _t in result.moved})
        text = f"intent {intent_id} resolved as {decision}; {moved} items moved"
        if result.errors:
            return actions.FAILED, text + "; errors: " + "; ".join(
                mask_text(e) or "" for e in result.errors
            )
        return actions.DONE, text

    outcome, message = await run_in_threadpool(resolve)
    await run_in_threadpool(
        functools.partial(
            actions.record, console.engine.session, user_name=login.user.name,
            order_id=order_id, action=actions.RESOLVE, detail={"intent": intent_id,
            "decision": decision, "note": note}, outcome=outcome, message=message,
        )
    )
    kind = {"done": "ok", "refused": "refused", "failed": "error"}[outcome]
    await run_in_threadpool(
        console.users.push_flash, login.id, kind, f"resolve intent {intent_id}: {message}"
    )
    return RedirectResponse(_url(request, "order", ref=ref), 303)


async def gateway_call(console: _Console, request: Request, login: LoginSession) -> Response:
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


async def matrix(console: _Console, request: Request, login: LoginSession) -> Response:
    result = await run_in_threadpool(
        lambda: build_matrix(console.engine, definitions=console.engine.definitions())
    )
    return console.render(request, "matrix.html", login=login, matrix=result)


async def process_page(console: _Console, request: Request, login: LoginSession) -> Response:
    name = request.path_params["name"]
    definition = console.engine.definitions().get(name)
    if definition is None:
        return console.refuse(request, 404, f"No process {name!r}.", login)
    svg, mermaid = await run_in_threadpool(process_svg, definition, {})
    return console.render(request, "process.html", login=login, name=name, svg=svg,
                          mermaid=mermaid)


async def home(console: _Console, request: Request, login: LoginSession) -> Response:
    return RedirectResponse(_url(request, "orders"), 303)


def create_app(
    engine: Any,
    *,
    secure_cookies: bool | None = None,
    session_hours: int = SESSION_HOURS,
    event_data: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    debug: bool = False,
) -> Starlette:
    """The console for ``engine`` (a ``ratepay_oms.Engine`` whose database is upgraded).

    ``secure_cookies``: ``None`` sets the cookies' Secure flag when the request came over
    HTTPS (behind a TLS proxy run uvicorn with ``--proxy-headers``), ``True`` always (do this
    in production), ``False`` never. ``event_data``: which data fields each event's form
    offers (default: invoice id, tracking id and carrier for ``ship``).
    """
    console = _Console(
        engine, secure_cookies=secure_cookies, session_hours=session_hours,
        event_data=DEFAULT_EVENT_DATA if event_data is None else event_data,
    )

    def bound(fn: Callable[..., Awaitable[Response]]) -> Handler:
        async def handler(request: Request) -> Response:
            return await fn(console, request)

        return handler

    page = functools.partial(_page, console)
    static = Path(__file__).with_name("static")
    routes = [
        Route("/", page()(home), name="home"),
        Route("/login", bound(login_page), methods=["GET"], name="login"),
        Route("/login", bound(login_post), methods=["POST"], name="login_post"),
        Route("/logout", page(post=True)(logout), methods=["POST"], name="logout"),
        Route("/orders", page()(orders), name="orders"),
        Route("/orders/{ref}", page()(order_page), name="order"),
        Route("/orders/{ref}/events", page(operator=True, post=True)(fire_event),
              methods=["POST"], name="events"),
        Route("/orders/{ref}/intents/{intent_id:int}/resolve",
              page(operator=True, post=True)(resolve_intent), methods=["POST"], name="resolve"),
        Route("/orders/{ref}/calls/{call_id:int}", page()(gateway_call), name="call"),
        Route("/matrix", page()(matrix), name="matrix"),
        Route("/processes/{name}", page()(process_page), name="process"),
        Mount("/static", app=StaticFiles(directory=static), name="static"),
    ]
    return Starlette(debug=debug, routes=routes)
