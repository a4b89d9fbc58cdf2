"""What every page and action of the console shares: the ``Console`` (engine, users, templates,
settings), building URLs under the mount point, and the ``page`` wrapper that enforces a login,
the CSRF token on POSTs and the operator role."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ratepay_oms.web.users import LoginSession, UserStore

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
    "ship": (
        ("invoice_id", "Invoice id"),
        ("tracking_ids", "Tracking ids (space separated)"),
        ("carrier", "Carrier"),
    ),
}
"""Event → the data fields its form offers (key, label), the keys of ``Engine.trigger``'s
``data`` (``ratepay-oms event … --invoice-id --tracking-id --carrier``); a key ending in
``_ids`` is sent as a list. A shop passes its own mapping to ``create_app``."""

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

class Console:
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
        orders_path = url(request, "orders")
        html = self.templates.get_template(template).render(
            request=request, root=root, url=functools.partial(url, request),
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
        engine's own history then says who fired the event, beside our operator log.

        A shallow copy with another ``origin`` (the engine's public attribute; the context it
        hands its drive loop carries it too). An engine without either is used as it is: the
        operator log still names the user.
        """
        origin = getattr(self.engine, "origin", None)
        if origin is None:
            return self.engine
        acting = copy.copy(self.engine)
        acting.origin = dataclasses.replace(
            origin, argv=f"ratepay-oms web: user {login.user.name} ({login.user.role})"
        )
        context = getattr(self.engine, "context", None)
        if dataclasses.is_dataclass(context) and not isinstance(context, type):
            acting.context = dataclasses.replace(context, origin=acting.origin)
        return acting

def url(request: Request, name: str, /, query: Mapping[str, Any] | None = None,
         **path: Any) -> str:
    """The path of route ``name`` under wherever the app is mounted, plus a query string."""
    url = str(request.url_for(name, **{k: str(v) for k, v in path.items()}).path)
    if query:
        url += "?" + urlencode({k: v for k, v in query.items() if v not in (None, "")})
    return url


def page(console: Console, *, operator: bool = False, post: bool = False) -> Callable[
    [Callable[[Console, Request, LoginSession], Awaitable[Response]]], Handler
]:
    """Wrap an endpoint: a login is required (GET: redirect to the login page), POSTs need the
    session's CSRF token (403), ``operator`` endpoints refuse viewers (403)."""

    def wrap(
        endpoint: Callable[[Console, Request, LoginSession], Awaitable[Response]],
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
                    url(request, "login", query={"next": target}), status_code=303
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
