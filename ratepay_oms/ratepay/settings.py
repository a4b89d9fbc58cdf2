"""RatePAY configuration: the seed's keys, from the environment and/or a TOML file.

Environment variables are ``RATEPAY_<KEY>`` (``RATEPAY_PROFILE_ID``, …,
``RATEPAY_RATEPAY_REQUEST_VERSION``); the TOML file has a ``[ratepay]`` table with the keys as
written (``PROFILE_ID = "…"``). The environment wins over the file, so a deployment can keep the
secret out of the file.

The Transaction Status API (reconciliation of lost answers) has its own credentials: an OAuth2
client (``OAUTH_CLIENT_ID`` / ``OAUTH_CLIENT_SECRET``, issued by RatePAY separately from the
profile id and security code), the token URL, the audience and the status URL. The last three
default per ``MODE`` (reference ``ratepay-transaction-status-api.md``); without a client id and
secret there is no status source and a lost answer waits for a person.

The security code and the client secret are held in fields that ``repr``/``str`` never show;
nothing in this module formats them into a message.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ratepay_oms.ratepay.errors import RatepaySettingsError
from ratepay_oms.ratepay.xml import ENVELOPE_VERSION, MASK, RATEPAY_NS

log = logging.getLogger(__name__)

ENV_PREFIX = "RATEPAY_"
TOML_TABLE = "ratepay"

DEFAULT_TEST_URL = "https://gateway-int.ratepay.com/api/xml/1_0"
DEFAULT_LIVE_URL = "https://gateway.ratepay.com/api/xml/1_0"
MODES = ("test", "live")

DEFAULT_OAUTH_TOKEN_URL = "https://oauth.ratepay.com/oauth/token"
DEFAULT_STATUS_API_URLS = {
    "test": "https://api-integration.ratepay.com/order/status/v2/transactions",
    "live": "https://api.ratepay.com/order/status/v2/transactions",
}
"""The status API per MODE, without the transaction id; also the OAuth audience per MODE."""

SECRET_FIELDS = ("security_code", "oauth_client_secret")

REQUIRED_KEYS = ("PROFILE_ID", "SECURITY_CODE")
KEYS = (
    "PROFILE_ID",
    "SECURITY_CODE",
    "SHOP_ID",
    "SYSTEM_ID",
    "MODE",
    "CLIENT_VERSION",
    "CLIENT_NAME",
    "RATEPAY_REQUEST_VERSION",
    "RATEPAY_REQUEST_XMLNS_URN",
    "API_TEST_URL",
    "API_LIVE_URL",
    "STATUS_API_URL",
    "OAUTH_CLIENT_ID",
    "OAUTH_CLIENT_SECRET",
    "OAUTH_TOKEN_URL",
    "OAUTH_AUDIENCE",
    "STATUS_PROCESSING_OFFSET_HOURS",
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "TIME_ZONE",
    "PAYMENT_TERM_DAYS",
    "VOUCHER_RULE",
    "COUNTRIES",
    "CURRENCIES",
)
PROFILES_TABLE = "profiles"
"""``[ratepay.profiles.<NAME>]``: several RatePAY profiles (see ``ratepay.profiles``)."""

VOUCHER_RULES = ("last_delivery", "prorata")
"""How the order discount is settled over partial deliveries (docs/processes.md)."""


@dataclass(frozen=True)
class RatepaySettings:
    """Validated settings; build them with ``from_env``, ``from_toml`` or ``from_mapping``."""

    profile_id: str
    security_code: str = field(repr=False)
    system_id: str = "ratepay-oms"
    shop_id: str | None = None
    mode: str = "test"
    client_name: str = "ratepay-oms"
    client_version: str = "0.1.0"
    request_version: str = ENVELOPE_VERSION
    xmlns_urn: str = RATEPAY_NS
    api_test_url: str = DEFAULT_TEST_URL
    api_live_url: str = DEFAULT_LIVE_URL
    status_api_url: str | None = None
    oauth_client_id: str | None = None
    oauth_client_secret: str | None = field(default=None, repr=False)
    oauth_token_url: str = DEFAULT_OAUTH_TOKEN_URL
    oauth_audience: str | None = None
    status_processing_offset_hours: float = 24.0
    """How long a booking may take to show in the status API when an answer does not say it
    (a 404 carries no ``maximum_processing_offset_in_hours``; [INF] default)."""
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    time_zone: str = "Europe/Berlin"
    """The shop's time zone: invoicing dates are sent as its local time (RatePAY's format has
    no zone)."""
    payment_term_days: int | None = None
    """Due date = invoice date + this many days; unset: no due date (RatePAY's contract term)."""
    voucher_rule: str = "last_delivery"
    countries: tuple[str, ...] = ()
    """Billing countries this profile serves (profile choice); empty: the stored profile's."""
    currencies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in REQUIRED_KEYS:
            if not getattr(self, key.lower()):
                raise RatepaySettingsError(
                    f"RatePAY setting {key} is missing: set RATEPAY_{key} or {key} in [ratepay]"
                )
        if self.mode not in MODES:
            raise RatepaySettingsError(
                f"RatePAY setting MODE must be 'test' or 'live', got {self.mode!r}"
            )
        for key, url in (
            ("API_TEST_URL", self.api_test_url),
            ("API_LIVE_URL", self.api_live_url),
            ("STATUS_API_URL", self.status_api_url),
            ("OAUTH_TOKEN_URL", self.oauth_token_url),
        ):
            if url is not None and urlparse(url).scheme not in ("http", "https"):
                # The value is not echoed: a secret pasted into the wrong key would leak.
                raise RatepaySettingsError(
                    f"RatePAY setting {key} is not an http(s) URL (expected https://…)"
                )
        for key, seconds in (
            ("CONNECT_TIMEOUT", self.connect_timeout),
            ("READ_TIMEOUT", self.read_timeout),
        ):
            if not seconds > 0:
                raise RatepaySettingsError(f"RatePAY setting {key} must be > 0 seconds")
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise RatepaySettingsError(
                f"RatePAY setting TIME_ZONE is not a known time zone: {self.time_zone!r}"
            ) from None
        if self.payment_term_days is not None and not 0 <= self.payment_term_days <= 365:
            raise RatepaySettingsError("RatePAY setting PAYMENT_TERM_DAYS must be 0 to 365 days")
        if self.voucher_rule not in VOUCHER_RULES:
            raise RatepaySettingsError(
                f"RatePAY setting VOUCHER_RULE must be one of {', '.join(VOUCHER_RULES)}, "
                f"got {self.voucher_rule!r}"
            )
        if bool(self.oauth_client_id) != bool(self.oauth_client_secret):
            missing = "OAUTH_CLIENT_SECRET" if self.oauth_client_id else "OAUTH_CLIENT_ID"
            raise RatepaySettingsError(
                f"RatePAY setting {missing} is missing: the status API needs both "
                f"OAUTH_CLIENT_ID and OAUTH_CLIENT_SECRET (set RATEPAY_{missing} or {missing} "
                "in [ratepay]), or neither"
            )
        if self.mode == "live" and self.api_live_url.startswith("http://"):
            log.warning("RatePAY live mode over plain http: %s", self.api_live_url)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={MASK!r}"
            if f.name in SECRET_FIELDS and getattr(self, f.name)
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"RatepaySettings({shown})"

    __str__ = __repr__

    @property
    def api_url(self) -> str:
        """The XML gateway URL for the configured MODE."""
        return self.api_live_url if self.mode == "live" else self.api_test_url

    @property
    def status_url(self) -> str:
        """The Transaction Status API base (no trailing slash, no transaction id)."""
        return (self.status_api_url or DEFAULT_STATUS_API_URLS[self.mode]).rstrip("/")

    @property
    def audience(self) -> str:
        """The OAuth audience of the status API for the configured MODE."""
        return self.oauth_audience or DEFAULT_STATUS_API_URLS[self.mode]

    @property
    def status_lookup_configured(self) -> bool:
        """True when the status API can be asked (an OAuth client id and secret are set)."""
        return bool(self.oauth_client_id and self.oauth_client_secret)

    def secrets(self) -> tuple[str, ...]:
        """The secret values of these settings, for masking texts that might echo them."""
        return tuple(v for v in (self.security_code, self.oauth_client_secret) if v)

    # --- constructors --------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RatepaySettings:
        """Settings from a mapping keyed like the seed (``PROFILE_ID``, ``MODE``, …).

        Unknown keys are refused (a typo would otherwise silently fall back to a default).
        """
        unknown = sorted(set(values) - set(KEYS))
        if unknown:
            raise RatepaySettingsError(
                f"unknown RatePAY setting(s) {', '.join(unknown)}; known: {', '.join(KEYS)}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if value is None or (isinstance(value, str) and value.strip() == ""):
                continue
            kwargs[_FIELD_BY_KEY[key]] = _convert(key, value)
        for key in REQUIRED_KEYS:
            if _FIELD_BY_KEY[key] not in kwargs:
                raise RatepaySettingsError(
                    f"RatePAY setting {key} is missing: set RATEPAY_{key} or {key} in [ratepay]"
                )
        return cls(**kwargs)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        toml_path: str | os.PathLike[str] | None = None,
    ) -> RatepaySettings:
        """Settings from ``RATEPAY_<KEY>`` variables over an optional TOML ``[ratepay]`` table."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if toml_path is not None:
            values.update(_read_toml(Path(toml_path)))
        for key in KEYS:
            raw = env.get(ENV_PREFIX + key)
            if raw is not None and raw.strip() != "":
                values[key] = raw.strip()
        return cls.from_mapping(values)

    @classmethod
    def from_toml(cls, toml_path: str | os.PathLike[str]) -> RatepaySettings:
        return cls.from_mapping(_read_toml(Path(toml_path)))


_FIELD_BY_KEY = {
    "PROFILE_ID": "profile_id",
    "SECURITY_CODE": "security_code",
    "SHOP_ID": "shop_id",
    "SYSTEM_ID": "system_id",
    "MODE": "mode",
    "CLIENT_VERSION": "client_version",
    "CLIENT_NAME": "client_name",
    "RATEPAY_REQUEST_VERSION": "request_version",
    "RATEPAY_REQUEST_XMLNS_URN": "xmlns_urn",
    "API_TEST_URL": "api_test_url",
    "API_LIVE_URL": "api_live_url",
    "STATUS_API_URL": "status_api_url",
    "OAUTH_CLIENT_ID": "oauth_client_id",
    "OAUTH_CLIENT_SECRET": "oauth_client_secret",
    "OAUTH_TOKEN_URL": "oauth_token_url",
    "OAUTH_AUDIENCE": "oauth_audience",
    "STATUS_PROCESSING_OFFSET_HOURS": "status_processing_offset_hours",
    "CONNECT_TIMEOUT": "connect_timeout",
    "READ_TIMEOUT": "read_timeout",
    "TIME_ZONE": "time_zone",
    "PAYMENT_TERM_DAYS": "payment_term_days",
    "VOUCHER_RULE": "voucher_rule",
    "COUNTRIES": "countries",
    "CURRENCIES": "currencies",
}


def _convert(key: str, value: Any) -> Any:
    if key == "STATUS_PROCESSING_OFFSET_HOURS":
        if isinstance(value, bool):
            raise RatepaySettingsError(f"RatePAY setting {key} must be a number of hours")
        try:
            hours = float(value)
        except (TypeError, ValueError):
            raise RatepaySettingsError(f"RatePAY setting {key} must be a number of hours") from None
        if not 0 <= hours < 24 * 365:
            raise RatepaySettingsError(f"RatePAY setting {key} must be between 0 and 8760 hours")
        return hours
    if key in ("CONNECT_TIMEOUT", "READ_TIMEOUT"):
        if isinstance(value, bool):
            raise RatepaySettingsError(f"RatePAY setting {key} must be a number of seconds")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RatepaySettingsError(
                f"RatePAY setting {key} must be a number of seconds, got {value!r}"
            ) from None
    if key == "PAYMENT_TERM_DAYS":
        if isinstance(value, bool):
            raise RatepaySettingsError(f"RatePAY setting {key} must be a whole number of days")
        try:
            return int(str(value).strip())
        except ValueError:
            raise RatepaySettingsError(
                f"RatePAY setting {key} must be a whole number of days, got {value!r}"
            ) from None
    if key in ("COUNTRIES", "CURRENCIES"):
        parts = value if isinstance(value, list | tuple) else str(value).split(",")
        codes = tuple(str(p).strip().upper() for p in parts if str(p).strip())
        if not all(c.isalpha() and len(c) == (2 if key == "COUNTRIES" else 3) for c in codes):
            example = "DE, AT" if key == "COUNTRIES" else "EUR, CHF"
            raise RatepaySettingsError(
                f"RatePAY setting {key} must list ISO codes ({example}), got {value!r}"
            )
        return codes
    if key == "VOUCHER_RULE":
        return str(value).strip().lower()
    if key == "MODE":
        mode = str(value).strip().lower()
        # Spryker's first config used MODE_TEST / MODE_LIVE; accept those spellings too.
        return mode.removeprefix("mode_")
    if not isinstance(value, str | int):
        # Never echo the value: it might be the security code or the client secret.
        raise RatepaySettingsError(f"RatePAY setting {key} must be a string")
    return str(value).strip()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise RatepaySettingsError(f"RatePAY settings file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RatepaySettingsError(
            f"RatePAY settings file {path} is not valid TOML: {exc}"
        ) from None
    table = document.get(TOML_TABLE)
    if table is None:
        raise RatepaySettingsError(f"RatePAY settings file {path} has no [{TOML_TABLE}] table")
    if not isinstance(table, dict):
        raise RatepaySettingsError(f"[{TOML_TABLE}] in {path} must be a table")
    values = dict(table)
    values.pop(PROFILES_TABLE, None)  # read by ratepay.profiles
    return values
