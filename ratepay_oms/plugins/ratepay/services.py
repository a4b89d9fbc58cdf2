"""Build the ``services`` the RatePAY commands need: ``{"ratepay": RatepayFacade}``.

The facade's API log goes to the engine's own database, one row per call in a short
transaction of its own (``SqlApiLogSink``): the engine makes every gateway call outside any
transaction (see ``ratepay_oms.engine.drive``), so the row is written at once, never waits for
the engine's write lock, and survives whatever the engine does with the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from ratepay_oms.plugins.ratepay.commands import SERVICE_NAME
from ratepay_oms.plugins.ratepay.installments import SERVICE_NAME as INSTALLMENTS
from ratepay_oms.plugins.ratepay.installments import InstallmentCalculator
from ratepay_oms.ratepay import (
    RatepayFacade,
    RatepaySettings,
    SqlApiLogSink,
)

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
    toml_path: str | None = None,
) -> dict[str, Any]:
    """``{"ratepay": facade, "installments": calculator}`` from ``RATEPAY_<KEY>`` variables
    (and an optional TOML file), for ``Engine(services=...)``. Raises ``RatepaySettingsError``
    naming a missing key."""
    settings = RatepaySettings.from_env(environ, toml_path)
    return facade_services(build_facade(settings, session_factory))


def facade_services(facade: RatepayFacade) -> dict[str, Any]:
    """The services the RatePAY plugin offers around one facade."""
    return {SERVICE_NAME: facade, INSTALLMENTS: InstallmentCalculator(facade)}


def ratepay_services_if_configured(
    session_factory: Callable[[], Session] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Like ``ratepay_services`` but ``{}`` when no ``RATEPAY_PROFILE_ID`` is set at all, so
    console commands that never reach RatePAY (``order show``) work without configuration;
    a partial configuration still fails loudly."""
    import os

    env = os.environ if environ is None else environ
    if not env.get("RATEPAY_PROFILE_ID"):
        return {}
    return ratepay_services(session_factory, environ=env)


def attach_configured_ratepay(engine: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Give ``engine`` (an ``Engine``) the facade from ``RATEPAY_*`` settings, with its API log
    in the engine's database; ``False`` (nothing attached) when RatePAY is not configured.
    This is what the console's ``engine_from_options`` calls, so ``ratepay-oms tick`` talks to
    the configured gateway."""
    services = ratepay_services_if_configured(engine.session, environ=environ)
    engine.services.update(services)
    return bool(services)
