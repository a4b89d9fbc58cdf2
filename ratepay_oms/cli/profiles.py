"""``ratepay-oms profile``: what RatePAY says about each configured profile.

``refresh`` asks RatePAY (PROFILE_REQUEST) and keeps the answers in the database; every order is
checked against its profile's stored answer before its PAYMENT_REQUEST. ``show`` prints them.
Neither ever prints a security code (nothing of it is stored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ratepay_oms.cli import cli
from ratepay_oms.cli._common import (
    engine_from_options,
    engine_options,
    fmt_time,
    print_json,
    stdout_console,
    translate_db_errors,
)
from ratepay_oms.errors import OmsError


class RatepayNotConfiguredForProfiles(OmsError):
    """``profile refresh`` without any RatePAY settings."""


def _view(name: str, configured: Any, stored: Any) -> dict[str, Any]:
    """One profile as ``show --json`` prints it (no credential, only the profile id)."""
    view: dict[str, Any] = {
        "name": name,
        "configured": configured is not None,
        "profile_id": configured.profile_id if configured is not None else stored.profile_id,
        "countries": list(configured.countries) if configured is not None else [],
        "currencies": list(configured.currencies) if configured is not None else [],
        "refreshed_at": stored.refreshed_at if stored is not None else None,
    }
    if stored is not None:
        data = stored.data
        view.update(
            merchant_name=data.merchant_name,
            shop_name=data.shop_name,
            merchant_active=data.merchant_active,
            billing_countries=list(data.billing_countries),
            delivery_countries=list(data.delivery_countries),
            profile_currencies=list(data.currencies),
            methods={
                m: {
                    "activation_status": t.activation_status,
                    "eligible": t.eligible,
                    "accepts_new_orders": t.accepts_new_orders,
                    "tx_limit_min": t.tx_limit_min,
                    "tx_limit_max": t.tx_limit_max,
                    "tx_limit_max_b2b": t.tx_limit_max_b2b,
                    "b2b": t.b2b,
                    "delivery_address": t.delivery_address,
                }
                for m, t in data.methods.items()
            },
        )
    return view


@cli.group("profile")
def profile() -> None:
    """RatePAY profiles: refresh them from RatePAY, show what is kept.

    \b
    Example:
      ratepay-oms profile refresh
      ratepay-oms profile show DE
    """


@profile.command("refresh")
@engine_options
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--json", "as_json", is_flag=True, help="Print the stored answers as JSON.")
@translate_db_errors
def profile_refresh(
    db_url: str | None, process_dir: Path | None, names: tuple[str, ...], as_json: bool
) -> None:
    """Ask RatePAY for the profiles (PROFILE_REQUEST; all configured ones without NAME) and
    keep the answers. Exit 1 when RatePAY refuses one: then nothing is stored.

    \b
    Example:
      ratepay-oms profile refresh DE CH
    """
    from ratepay_oms.engine.clock import wall_now
    from ratepay_oms.plugins.ratepay.profiles import profiles_of, refresh

    engine = engine_from_options(db_url, process_dir)
    profiles = profiles_of(engine.services)
    if profiles is None:
        raise RatepayNotConfiguredForProfiles(
            "RatePAY is not configured: set RATEPAY_PROFILE_ID / RATEPAY_SECURITY_CODE or "
            "point RATEPAY_OMS_CONFIG at a settings file with [ratepay] (and its profiles)"
        )
    stored = refresh(engine.session, profiles, names or None, wall_now())
    if as_json:
        print_json([_view(s.name, profiles.profiles.profiles.get(s.name), s) for s in stored])
        return
    for s in stored:
        click.echo(
            f"profile {s.name} ({s.profile_id}) refreshed: "
            f"{', '.join(m for m, t in s.data.methods.items() if t.accepts_new_orders) or 'no'}"
            f" method(s) open for new orders; billing countries "
            f"{', '.join(s.data.billing_countries) or '-'}; currencies "
            f"{', '.join(s.data.currencies) or '-'}"
        )


@profile.command("show")
@engine_options
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
@translate_db_errors
def profile_show(
    db_url: str | None, process_dir: Path | None, name: str | None, as_json: bool
) -> None:
    """Show the configured profiles and what RatePAY last said about each.

    \b
    Example:
      ratepay-oms profile show --json | jq '.[].methods.INVOICE.tx_limit_max'
    """
    from ratepay_oms.plugins.ratepay.profiles import profiles_of, stored_profiles

    engine = engine_from_options(db_url, process_dir)
    profiles = profiles_of(engine.services)
    configured = dict(profiles.profiles.profiles) if profiles is not None else {}
    with engine.session() as session:
        stored = stored_profiles(session)
    names = list(dict.fromkeys([*configured, *stored]))
    if name is not None:
        if name not in names:
            raise OmsError(
                f"no profile {name!r}; known: {', '.join(names) or 'none'} "
                "(configure it, then run: ratepay-oms profile refresh)"
            )
        names = [name]
    views = [_view(n, configured.get(n), stored.get(n)) for n in names]
    if as_json:
        print_json(views)
        return
    if not views:
        click.echo("no RatePAY profile configured or stored")
        return
    console = stdout_console()
    for v in views:
        refreshed = fmt_time(v["refreshed_at"]) if v["refreshed_at"] else "never (run refresh)"
        console.print(
            f"[bold]{v['name']}[/bold]  profile id {v['profile_id']}  refreshed {refreshed}"
            + ("" if v["configured"] else "  (no longer configured)")
        )
        if "methods" not in v:
            continue
        console.print(
            f"  merchant {'active' if v['merchant_active'] else 'NOT active'}; billing "
            f"{', '.join(v['billing_countries']) or '-'}; delivery "
            f"{', '.join(v['delivery_countries']) or '-'}; currencies "
            f"{', '.join(v['profile_currencies']) or '-'}"
        )
        table = Table(show_lines=False)
        for column in ("method", "status", "min", "max", "max B2B", "B2B", "other delivery"):
            table.add_column(column)
        labels = {1: "inactive", 2: "active", 3: "phased out"}
        for method, t in v["methods"].items():
            table.add_row(
                method,
                labels.get(t["activation_status"], "?")
                + ("" if t["eligible"] or t["activation_status"] != 2 else " (not eligible)"),
                str(t["tx_limit_min"] or "-"),
                str(t["tx_limit_max"] or "-"),
                str(t["tx_limit_max_b2b"] or "-"),
                "yes" if t["b2b"] else "no",
                "yes" if t["delivery_address"] else "no",
            )
        console.print(table)
