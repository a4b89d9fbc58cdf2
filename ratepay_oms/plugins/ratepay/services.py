"""Build the ``services`` the RatePAY commands need: ``{"ratepay": RatepayFacade,
"ratepay_profiles": RatepayProfiles}`` (one facade per configured profile).

The facade's API log goes to the engine's own database (``SqlApiLogSink``). The engine makes
every gateway call outside any transaction (see ``ratepay_oms.engine.drive``) and has the rows
of a call written by the transaction that settles it (one INSERT, no connection of their own);
if that transaction does not commit, each row is written in a short transaction of its own, so
the row survives whatever the engine does with the answer. A call made outside the engine's
drive (the console's own, a facade used directly) writes its row at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from ratepay_oms.plugins.ratepay.commands import SERVICE_NAME
from ratepay_oms.plugins.ratepay.installments import SERVICE_NAME as INSTALLMENTS
from ratepay_oms.plugins.ratepay.installments import InstallmentCalculator
from ratepay_oms.plugins.ratepay.profiles import PROFILES_SERVICE, RatepayProfiles
from ratepay_oms.ratepay import (
    RatepayFacade,
    RatepaySettings,
    SqlApiLogSink,
)
from ratepay_oms.ratepay.profiles import PROFILE_ENV_PREFIX, ProfileSet

CONFIG_ENV = "RATEPAY_OMS_CONFIG"
"""A TOML settings file with a ``[ratepay]`` table (and its profiles) for the console."""

log = logging.getLogger(__name__)


def build_facade(
    settings: RatepaySettings, session_factory: Callable[[], Session] | None = None
) -> RatepayFacade:
    """A facade on ``settings`` whose API log goes to the database of ``session_factory``."""
    sink = SqlApiLogSink(session_factory) if session_factory else None
    return RatepayFacade(settings, api_log=sink)


def ratepay_services(
    session_factory: Callable[[], Session] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    toml_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """``{"ratepay": facade, "ratepay_profiles": RatepayProfiles, "installments": calculator}``
    from ``RATEPAY_<KEY>`` / ``RATEPAY_PROFILE_<NAME>_<KEY>`` variables and an optional TOML
    file (with ``[ratepay.profiles.<NAME>]`` tables), for ``Engine(services=...)``.
    ``"ratepay"`` is the default profile's facade. Raises ``RatepaySettingsError`` naming a
    missing key."""
    profile_set = ProfileSet.load(environ, toml_path)
    facades = {
        name: build_facade(profile_set[name], session_factory) for name in profile_set.names
    }
    services = facade_services(facades[profile_set.default])
    services[PROFILES_SERVICE] = RatepayProfiles(profile_set, facades)
    return services


def facade_services(facade: RatepayFacade) -> dict[str, Any]:
    """The services the RatePAY plugin offers around one facade."""
    return {SERVICE_NAME: facade, INSTALLMENTS: InstallmentCalculator(facade)}


def _configured(env: Mapping[str, str], toml_path: str | None) -> bool:
    if toml_path is not None or env.get("RATEPAY_PROFILE_ID"):
        return True
    return any(
        var.startswith(PROFILE_ENV_PREFIX) and var.endswith("_PROFILE_ID") and value.strip()
        for var, value in env.items()
    )


def ratepay_services_if_configured(
    session_factory: Callable[[], Session] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    toml_path: str | None = None,
) -> dict[str, Any]:
    """Like ``ratepay_services`` but ``{}`` when no profile id is set at all (no
    ``RATEPAY_PROFILE_ID``, no ``RATEPAY_PROFILE_<NAME>_PROFILE_ID``, no settings file), so
    console commands that never reach RatePAY (``order show``) work without configuration;
    a partial configuration still fails loudly."""
    env = os.environ if environ is None else environ
    if toml_path is None and env.get(CONFIG_ENV):
        toml_path = env[CONFIG_ENV]
    if not _configured(env, toml_path):
        return {}
    return ratepay_services(session_factory, environ=env, toml_path=toml_path)


def attach_configured_ratepay(
    engine: Any, environ: Mapping[str, str] | None = None, toml_path: str | None = None
) -> bool:
    """Give ``engine`` (an ``Engine``) the facades of the configured profiles, with their API
    log in the engine's database; ``False`` (nothing attached) when RatePAY is not configured.
    This is what the console's ``engine_from_options`` calls, so ``ratepay-oms tick`` talks to
    the configured gateway."""
    services = ratepay_services_if_configured(
        engine.session, environ=environ, toml_path=toml_path
    )
    engine.services.update(services)
    return bool(services)
