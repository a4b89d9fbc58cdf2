"""``ratepay-oms web``: run the back-office web console and manage who may log in.

``serve`` needs the ``web`` extra and says so when it is missing; the user commands need only
the base install. Passwords are read from standard input (one line; asked twice on a
terminal), never from the command line, where they would land in the shell history and in
``ps``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    check_database_url,
    db_option,
    engine_from_options,
    engine_options,
    fmt_time,
    require_existing_database,
    resolve_database_url,
    stderr_console,
    stdout_console,
    translate_db_errors,
)
from ratepay_oms.errors import OmsError
from ratepay_oms.persistence.web import ROLES
from ratepay_oms.web import WEB_EXTRA_HINT


class WebExtraMissingError(OmsError):
    """Starlette, Jinja2, uvicorn or python-multipart is not installed."""


def _store(db_url: str | None):  # type: ignore[no-untyped-def]
    from ratepay_oms.persistence.db import create_db_engine, session_factory
    from ratepay_oms.web.users import UserStore

    url = check_database_url(resolve_database_url(db_url))
    require_existing_database(url)
    return UserStore(session_factory(create_db_engine(url)))


@cli.group("web")
def web() -> None:
    """The back-office web console (needs: pip install 'ratepay-oms[web]').

    \b
    Example:
      ratepay-oms web adduser alice --role operator < alice.password
      ratepay-oms web serve --host 127.0.0.1 --port 8080 --prefix /oms
    """


@web.command("serve")
@engine_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--prefix", default="", metavar="PATH",
              help="Serve under this path (e.g. /oms), as a reverse proxy forwards it.")
@click.option("--secure-cookies/--no-secure-cookies", default=None,
              help="Mark cookies Secure (default: when the request came over HTTPS; behind a "
              "TLS proxy pass --proxy-headers or set this).")
@click.option("--proxy-headers", is_flag=True,
              help="Trust X-Forwarded-Proto/For from the proxy at --forwarded-allow-ips.")
@click.option("--forwarded-allow-ips", default="127.0.0.1", show_default=True)
@translate_db_errors
def serve(db_url: str | None, process_dir: Path | None, host: str, port: int, prefix: str,
          secure_cookies: bool | None, proxy_headers: bool, forwarded_allow_ips: str) -> None:
    """Run the console with uvicorn until interrupted.

    \b
    Example:
      ratepay-oms web serve --db postgresql+psycopg://oms@db/oms --port 8080 --prefix /oms
    """
    try:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import RedirectResponse
        from starlette.routing import Mount, Route

        from ratepay_oms.web.app import create_app
    except ImportError as exc:
        raise WebExtraMissingError(f"{WEB_EXTRA_HINT} (missing: {exc.name})") from None
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    engine = engine_from_options(db_url, process_dir)
    app = create_app(engine, secure_cookies=secure_cookies)
    if prefix:
        async def to_prefix(request):  # type: ignore[no-untyped-def]
            return RedirectResponse(prefix + "/", 307)

        app = Starlette(routes=[Route("/", to_prefix), Mount(prefix, app=app)])
    stderr_console().print(f"web console on http://{host}:{port}{prefix}/ (Ctrl-C stops it)")
    uvicorn.run(app, host=host, port=port, proxy_headers=proxy_headers,
                forwarded_allow_ips=forwarded_allow_ips, log_level="info")


def _read_password() -> str:
    if sys.stdin.isatty():
        return str(click.prompt("password", hide_input=True, confirmation_prompt=True))
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


@web.command("adduser")
@db_option
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), required=True,
              help="viewer: sees every page; operator: also fires events, resolves intents.")
@translate_db_errors
def adduser(db_url: str | None, name: str, role: str) -> None:
    """Add a console user; the password is read from standard input (one line).

    \b
    Example:
      printf '%s\\n' "$PASSWORD" | ratepay-oms web adduser alice --role operator
    """
    store = _store(db_url)
    user = store.add(name, role, _read_password())
    click.echo(f"user {user.name} added ({user.role})")


@web.command("deluser")
@db_option
@click.argument("name")
@translate_db_errors
def deluser(db_url: str | None, name: str) -> None:
    """Remove a console user and end their open sessions.

    \b
    Example:
      ratepay-oms web deluser alice
    """
    _store(db_url).delete(name)
    click.echo(f"user {name} removed")


@web.command("users")
@db_option
@translate_db_errors
def users(db_url: str | None) -> None:
    """List the console users (name, role, added, last login).

    \b
    Example:
      ratepay-oms web users
    """
    rows = _store(db_url).users()
    table = Table("user", "role", "added (UTC)", "last login (UTC)")
    for user in rows:
        table.add_row(user.name, user.role, fmt_time(user.created_at), fmt_time(user.last_login_at))
    stdout_console().print(table)
    if not rows:
        click.echo("no users yet: ratepay-oms web adduser NAME --role operator", err=True)
