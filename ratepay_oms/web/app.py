"""The back-office web console as an ASGI app (Starlette, server-rendered Jinja2).

``create_app(engine)`` returns an app a shop mounts in its own backend
(``Mount("/oms", app=create_app(engine))``) or runs alone (``ratepay-oms web serve``). Every
page but the login needs a session; every POST needs the session's CSRF token (403 without);
viewers see, operators act. The app only calls the engine's public API (``trigger``,
``resolve_intent``, ``order``, ``intents``) and the console's read functions; everything it
writes itself is its users, sessions and operator log (``users``, ``actions``).

Order data is hostile: templates autoescape everything, the Content-Security-Policy allows no
inline script and nothing from another origin, and gateway XML is masked before it is shown.

Modules: ``base`` (the Console, URLs, the login/CSRF/role wrapper), ``login``, ``pages``
(reads), ``operate`` (events, intents), ``queries`` (paging), ``explain``, ``drawing``,
``users``, ``actions``, ``passwords``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ratepay_oms.web.base import DEFAULT_EVENT_DATA, Console, Handler, page
from ratepay_oms.web.login import login_page, login_post, logout
from ratepay_oms.web.operate import fire_event, resolve_intent
from ratepay_oms.web.pages import gateway_call, home, matrix, order_page, orders, process_page
from ratepay_oms.web.users import SESSION_HOURS

__all__ = ["DEFAULT_EVENT_DATA", "create_app"]


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
    console = Console(
        engine, secure_cookies=secure_cookies, session_hours=session_hours,
        event_data=DEFAULT_EVENT_DATA if event_data is None else event_data,
    )

    def bound(fn: Callable[..., Awaitable[Response]]) -> Handler:
        async def handler(request: Request) -> Response:
            return await fn(console, request)

        return handler

    guarded = functools.partial(page, console)
    static = Path(__file__).with_name("static")
    routes = [
        Route("/", guarded()(home), name="home"),
        Route("/login", bound(login_page), methods=["GET"], name="login"),
        Route("/login", bound(login_post), methods=["POST"], name="login_post"),
        Route("/logout", guarded(post=True)(logout), methods=["POST"], name="logout"),
        Route("/orders", guarded()(orders), name="orders"),
        Route("/orders/{ref}", guarded()(order_page), name="order"),
        Route("/orders/{ref}/events", guarded(operator=True, post=True)(fire_event),
              methods=["POST"], name="events"),
        Route("/orders/{ref}/intents/{intent_id:int}/resolve",
              guarded(operator=True, post=True)(resolve_intent), methods=["POST"], name="resolve"),
        Route("/orders/{ref}/calls/{call_id:int}", guarded()(gateway_call), name="call"),
        Route("/matrix", guarded()(matrix), name="matrix"),
        Route("/processes/{name}", guarded()(process_page), name="process"),
        Mount("/static", app=StaticFiles(directory=static), name="static"),
    ]
    return Starlette(debug=debug, routes=routes)
