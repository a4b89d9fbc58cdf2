"""Logging in and out: the login form (with a CSRF token of its own, a double-submit cookie,
because there is no session yet), the session cookie, and ending the session on the server."""

from __future__ import annotations

import secrets

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ratepay_oms.web.base import LOGIN_CSRF_COOKIE, SESSION_COOKIE, Console, url
from ratepay_oms.web.users import LoginSession, UserError


def _safe_next(request: Request, target: str | None) -> str:
    root = request.scope.get("root_path", "")
    if target and target.startswith((root or "") + "/") and not target.startswith("//") \
            and "\\" not in target:
        return target
    return url(request, "orders")


async def login_page(console: Console, request: Request, message: str | None = None,
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


async def login_post(console: Console, request: Request) -> Response:
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


async def logout(console: Console, request: Request, login: LoginSession) -> Response:
    await run_in_threadpool(console.users.logout, request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse(url(request, "login"), 303)
    response.delete_cookie(SESSION_COOKIE, path=console.cookie_path(request))
    return response
