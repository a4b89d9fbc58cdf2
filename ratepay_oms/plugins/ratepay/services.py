"""Build the ``services`` the RatePAY commands need: ``{"ratepay": RatepayFacade}``.

The facade's API log goes to the engine's own database, but not from inside the command: the
engine runs a command inside its state-change transaction, and on SQLite that transaction holds
the single write lock, so a log row written from a second connection would wait for it (up to
the busy timeout) and the command would stall. ``BackgroundApiLogSink`` hands records to one
writer thread that writes each in its own short transaction as soon as the lock is free — after
the engine commits or rolls back — so the log row survives a rolled-back command (that is when
it is needed most) and never blocks one.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from ratepay_oms.plugins.ratepay.commands import SERVICE_NAME
from ratepay_oms.plugins.ratepay.installments import SERVICE_NAME as INSTALLMENTS
from ratepay_oms.plugins.ratepay.installments import InstallmentCalculator
from ratepay_oms.ratepay import (
    ApiCallRecord,
    ApiLogSink,
    RatepayFacade,
    RatepaySettings,
    SqlApiLogSink,
)

log = logging.getLogger(__name__)

_STOP = object()


class BackgroundApiLogSink:
    """Queues API-log records and writes them through ``inner`` on one daemon thread.

    ``flush()`` waits until everything queued so far is written (the demo and tests call it
    before reading the log); ``close()`` flushes and stops the thread (also run at exit).
    """

    def __init__(self, inner: ApiLogSink) -> None:
        self.inner = inner
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="ratepay-api-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def record(self, call: ApiCallRecord) -> None:
        self._queue.put(call)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self.inner.record(item)  # type: ignore[arg-type]
            except Exception:  # the inner sinks log their own failures; never die here
                log.exception("API log writer failed")
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        if self._thread.is_alive():
            self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=10)


def build_facade(
    settings: RatepaySettings, session_factory: Callable[[], Session] | None = None
) -> RatepayFacade:
    """A facade on ``settings`` whose API log goes to the database of ``session_factory``."""
    sink = BackgroundApiLogSink(SqlApiLogSink(session_factory)) if session_factory else None
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
