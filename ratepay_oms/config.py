"""One way to configure the engine, for the console and for ``Engine(...)`` alike.

Every setting is looked up in the same order everywhere: what the caller passes (a ``--db``
option, ``Engine(database_url)``, an explicit ``RatepaySettings``) wins, then the environment
(``RATEPAY_OMS_*``, ``RATEPAY_*``), then the config file, then the default. The config file is
``--config FILE`` / ``Engine(config=FILE)``, else ``$RATEPAY_OMS_CONFIG``, else
``./ratepay-oms.toml`` when it exists:

.. code-block:: toml

    [oms]
    database_url = "postgresql+psycopg://oms@db.internal/oms"
    process_dir = "processes"          # relative to the file's folder
    plugins = ["shop_plugins:register"]

    [ratepay]
    PROFILE_ID = "INTEGRATION_TE_DACH"
    # SECURITY_CODE may stay in the environment: RATEPAY_SECURITY_CODE

RatePAY is attached when a ``PROFILE_ID`` is configured (environment or file); without it the
commands that never reach RatePAY work, and each RatePAY command fails with
``RatepayNotConfiguredError`` and is retried. This module sits above the rooms (it wires the
RatePAY plugins' facade into an engine), so the engine itself names no plugin.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratepay_oms.errors import OmsError

log = logging.getLogger(__name__)

CONFIG_ENV = "RATEPAY_OMS_CONFIG"
LOCAL_CONFIG_FILE = "ratepay-oms.toml"
OMS_KEYS = ("database_url", "process_dir", "plugins")
TABLES = ("oms", "ratepay")


class ConfigError(OmsError):
    """The config file is missing, not TOML, or has a key we do not know."""


@dataclass(frozen=True)
class OmsConfig:
    """What the config file says (everything ``None`` without a file)."""

    path: Path | None = None
    database_url: str | None = None
    process_dir: Path | None = None
    plugins: tuple[str, ...] = ()
    ratepay: Mapping[str, Any] = field(default_factory=dict)
    ratepay_optional: bool = False
    """True for work that never reaches RatePAY (``order show``): an incomplete RatePAY
    configuration is then logged and left out instead of refusing the command."""

    @classmethod
    def load(cls, explicit: str | os.PathLike[str] | None = None) -> OmsConfig:
        """Read the config file named by ``explicit``, ``$RATEPAY_OMS_CONFIG`` or the local
        ``ratepay-oms.toml``; an empty config when none is named and the local one is absent."""
        path = find_config_file(explicit)
        return cls() if path is None else cls.from_file(path)

    @classmethod
    def from_file(cls, path: Path) -> OmsConfig:
        try:
            with path.open("rb") as handle:
                document = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        unknown = sorted(set(document) - set(TABLES))
        if unknown:
            raise ConfigError(
                f"config file {path}: unknown table(s) {', '.join(unknown)}; "
                f"known: {', '.join(f'[{t}]' for t in TABLES)}"
            )
        oms = _table(document, "oms", path)
        ratepay = _table(document, "ratepay", path)
        bad = sorted(set(oms) - set(OMS_KEYS))
        if bad:
            raise ConfigError(
                f"config file {path}: unknown key(s) {', '.join(bad)} in [oms]; "
                f"known: {', '.join(OMS_KEYS)}"
            )
        url = oms.get("database_url")
        if url is not None and not isinstance(url, str):
            raise ConfigError(f"config file {path}: [oms] database_url must be a string")
        process_dir = oms.get("process_dir")
        if process_dir is not None and not isinstance(process_dir, str):
            raise ConfigError(f"config file {path}: [oms] process_dir must be a string")
        plugins = oms.get("plugins", [])
        if isinstance(plugins, str):
            plugins = [p.strip() for p in plugins.split(",") if p.strip()]
        if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
            raise ConfigError(
                f"config file {path}: [oms] plugins must be a list of 'module:function' strings"
            )
        return cls(
            path=path,
            database_url=url or None,
            process_dir=(path.parent / process_dir) if process_dir else None,
            plugins=tuple(plugins),
            ratepay=ratepay,
        )

    # -- the lookups, in the order the module docstring gives ------------------------------

    def resolve_database_url(self, explicit: str | None = None) -> str:
        from ratepay_oms.persistence.db import DATABASE_URL_ENV, DEFAULT_SQLITE_FILE

        return (
            explicit
            or os.environ.get(DATABASE_URL_ENV)
            or self.database_url
            or f"sqlite:///{DEFAULT_SQLITE_FILE}"
        )

    def resolve_process_dir(self, explicit: str | os.PathLike[str] | None = None) -> Path:
        """``explicit``, ``$RATEPAY_OMS_PROCESS_DIR``, the file's ``process_dir``,
        ``./processes``, the shipped processes (``process.loader.default_process_dir``)."""
        from ratepay_oms.process.loader import PROCESS_DIR_ENV, default_process_dir

        if explicit is None and not os.environ.get(PROCESS_DIR_ENV):
            explicit = self.process_dir
        return default_process_dir(explicit)

    def plugins_spec(self) -> str:
        """``module:function`` entries, comma separated: ``$RATEPAY_OMS_PLUGINS`` or the file's."""
        from ratepay_oms.engine.engine import PLUGINS_ENV

        env = os.environ.get(PLUGINS_ENV)
        return env if env is not None else ",".join(self.plugins)


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """``explicit``, else ``$RATEPAY_OMS_CONFIG``, else ``./ratepay-oms.toml`` if present.
    A file that is named but missing is an error; the local one is optional."""
    named = explicit if explicit is not None else os.environ.get(CONFIG_ENV) or None
    if named is not None:
        path = Path(named)
        if not path.is_file():
            source = "--config" if explicit is not None else f"${CONFIG_ENV}"
            raise ConfigError(f"config file not found: {path} (from {source})")
        return path
    local = Path(LOCAL_CONFIG_FILE)
    return local if local.is_file() else None


def _table(document: Mapping[str, Any], name: str, path: Path) -> dict[str, Any]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [{name}] must be a table")
    return dict(table)


def attach_ratepay(
    engine: Any,
    config: OmsConfig,
    settings: Any = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Give ``engine`` the RatePAY services (the facades of the configured profiles, with their
    API log in the engine's database, and the instalment calculator), unless its services have
    a facade already. ``settings`` (a ``RatepaySettings``) wins over the environment and the
    file; without it and without a configured profile nothing is attached (``False``). A
    partial configuration raises ``RatepaySettingsError`` (logged and skipped when
    ``config.ratepay_optional``)."""
    from ratepay_oms.plugins.ratepay.commands import SERVICE_NAME
    from ratepay_oms.plugins.ratepay.services import (
        CONFIG_ENV as SERVICES_CONFIG_ENV,
    )
    from ratepay_oms.plugins.ratepay.services import (
        build_facade,
        facade_services,
        ratepay_services_if_configured,
    )
    from ratepay_oms.ratepay.errors import RatepaySettingsError

    if SERVICE_NAME in engine.services:
        return False
    if settings is not None:
        engine.services.update(facade_services(build_facade(settings, engine.session)))
        return True
    # The file this config was read from, when it has a [ratepay] table; never a second lookup.
    env = dict(os.environ if environ is None else environ)
    env.pop(SERVICES_CONFIG_ENV, None)
    toml = str(config.path) if config.path is not None and config.ratepay else None
    try:
        services = ratepay_services_if_configured(engine.session, environ=env, toml_path=toml)
    except RatepaySettingsError as exc:
        if not config.ratepay_optional:
            raise
        log.warning("RatePAY not attached (not needed here): %s", exc)
        return False
    engine.services.update(services)
    return bool(services)
