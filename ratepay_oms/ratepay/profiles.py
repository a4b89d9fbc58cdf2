"""Several RatePAY profiles: their settings, what RatePAY says about each, and which one an
order uses.

A merchant gets one RatePAY profile per country, currency or shop (reference §2.2
``credential/profile-id``), each with its own ``PROFILE_ID`` and ``SECURITY_CODE``. In the TOML
file they are sub-tables of ``[ratepay]``; every key of ``[ratepay]`` is inherited except the
credentials, so a DE order can never go out with the CH profile's secret by accident::

    [ratepay]
    MODE = "test"
    TIME_ZONE = "Europe/Berlin"

    [ratepay.profiles.DE]
    PROFILE_ID = "SHOP_DE"
    COUNTRIES = ["DE", "AT"]
    CURRENCIES = ["EUR"]

    [ratepay.profiles.CH]
    PROFILE_ID = "SHOP_CH"
    TIME_ZONE = "Europe/Zurich"

The environment overrides per profile with ``RATEPAY_PROFILE_<NAME>_<KEY>``
(``RATEPAY_PROFILE_DE_SECURITY_CODE``), so secrets can stay out of the file. Without any
profile table, ``[ratepay]`` / ``RATEPAY_<KEY>`` is the one profile, named ``default``.

``ProfileData`` is the PROFILE_REQUEST answer (``master-data``, reference §4.7) in typed form:
the limits, countries, currencies and permissions an order is checked against before its
PAYMENT_REQUEST.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from ratepay_oms.ratepay.errors import RatepaySettingsError
from ratepay_oms.ratepay.settings import (
    ENV_PREFIX,
    KEYS,
    PROFILES_TABLE,
    TOML_TABLE,
    RatepaySettings,
)

PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,39}")
"""A profile's name in the settings (``[ratepay.profiles.DE]``) and in orders
(``payment.profile``): letters, digits and ``-`` (no ``_``, which separates the name from the
key in ``RATEPAY_PROFILE_<NAME>_<KEY>``)."""

DEFAULT_PROFILE = "default"
PROFILE_ENV_PREFIX = ENV_PREFIX + "PROFILE_"
CREDENTIAL_KEYS = ("PROFILE_ID", "SECURITY_CODE")

METHODS = ("INVOICE", "INSTALLMENT", "ELV", "PREPAYMENT")
"""The methods of ``master-data`` (lower case there: ``tx-limit-invoice-min``)."""

# activation-status-<method> (reference §4.7)
INACTIVE, ACTIVE, PHASED_OUT = 1, 2, 3


class UnknownProfileError(RatepaySettingsError):
    """An order or command names a profile the settings do not have."""


# --- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileSet:
    """The configured profiles by name, in configuration order; ``default`` is the one used
    where no order decides (``profile refresh`` without a name refreshes them all)."""

    profiles: Mapping[str, RatepaySettings]
    default: str

    def __post_init__(self) -> None:
        if not self.profiles:
            raise RatepaySettingsError("no RatePAY profile configured")
        if self.default not in self.profiles:
            raise RatepaySettingsError(f"default profile {self.default!r} is not configured")

    def __iter__(self) -> Iterator[str]:
        return iter(self.profiles)

    def __len__(self) -> int:
        return len(self.profiles)

    def __getitem__(self, name: str) -> RatepaySettings:
        try:
            return self.profiles[name]
        except KeyError:
            raise UnknownProfileError(
                f"unknown RatePAY profile {name!r}; configured: {', '.join(self.profiles)}"
            ) from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.profiles)

    @classmethod
    def single(cls, settings: RatepaySettings) -> ProfileSet:
        return cls({DEFAULT_PROFILE: settings}, DEFAULT_PROFILE)

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        toml_path: str | os.PathLike[str] | None = None,
    ) -> ProfileSet:
        """Profiles from an optional TOML file and the environment (environment wins).

        Raises ``RatepaySettingsError`` naming the profile and key that is missing or wrong;
        the message never holds a value of ``SECURITY_CODE``.
        """
        env = os.environ if environ is None else environ
        base: dict[str, Any] = {}
        tables: dict[str, dict[str, Any]] = {}
        if toml_path is not None:
            base, tables = _read(Path(toml_path))
        for key in KEYS:
            raw = env.get(ENV_PREFIX + key)
            if raw is not None and raw.strip():
                base[key] = raw.strip()
        for name, key, value in _profile_env(env):
            tables.setdefault(name, {})[key] = value
        if not tables:
            return cls.single(RatepaySettings.from_mapping(base))
        inherited = {k: v for k, v in base.items() if k not in CREDENTIAL_KEYS}
        profiles: dict[str, RatepaySettings] = {}
        if base.get("PROFILE_ID"):
            profiles[DEFAULT_PROFILE] = _settings(DEFAULT_PROFILE, base)
        for name, table in tables.items():
            profiles[name] = _settings(name, {**inherited, **table})
        return cls(profiles, next(iter(profiles)))

    def serving(self, name: str, stored: ProfileData | None) -> tuple[tuple[str, ...], ...]:
        """(billing countries, currencies) the profile serves: the settings' ``COUNTRIES`` /
        ``CURRENCIES`` when given, else what RatePAY said (``profile refresh``), else
        nothing known."""
        settings = self[name]
        countries = settings.countries or (stored.billing_countries if stored else ())
        currencies = settings.currencies or (stored.currencies if stored else ())
        return countries, currencies

    def choose(
        self,
        *,
        explicit: str | None,
        country: str,
        currency: str,
        stored: Mapping[str, ProfileData],
    ) -> str:
        """The profile for an order: the named one, else the first (in configuration order)
        serving its billing country and currency, else the only one. Raises
        ``UnknownProfileError`` with what to do when none fits."""
        if explicit is not None:
            self[explicit]  # raises for an unknown name
            return explicit
        for name in self.profiles:
            countries, currencies = self.serving(name, stored.get(name))
            if country in countries and currency in currencies:
                return name
        if len(self.profiles) == 1:
            return self.default
        unknown = [n for n in self.profiles if not all(self.serving(n, stored.get(n)))]
        hint = (
            f"; profiles {', '.join(unknown)} have no COUNTRIES/CURRENCIES setting and were "
            "never refreshed: run ratepay-oms profile refresh"
            if unknown
            else "; name one with payment.profile"
        )
        raise UnknownProfileError(
            f"no RatePAY profile serves billing country {country} in {currency}{hint}"
        )


def _settings(name: str, values: Mapping[str, Any]) -> RatepaySettings:
    if not PROFILE_NAME.fullmatch(name):
        raise RatepaySettingsError(
            f"RatePAY profile name {name!r}: use letters, digits and '-' only"
        )
    try:
        return RatepaySettings.from_mapping(values)
    except RatepaySettingsError as exc:
        raise RatepaySettingsError(f"RatePAY profile {name}: {exc}") from None


def _profile_env(env: Mapping[str, str]) -> Iterator[tuple[str, str, str]]:
    """``RATEPAY_PROFILE_<NAME>_<KEY>`` variables as (name, key, value)."""
    for var, raw in env.items():
        if not var.startswith(PROFILE_ENV_PREFIX) or raw is None or not raw.strip():
            continue
        rest = var[len(PROFILE_ENV_PREFIX):]
        for key in KEYS:
            if rest.endswith("_" + key):
                name = rest[: -len(key) - 1]
                if PROFILE_NAME.fullmatch(name):
                    yield name, key, raw.strip()
                break


def _read(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``[ratepay]`` without its profiles, and the profile tables by name."""
    import tomllib

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
    if not isinstance(table, dict):
        raise RatepaySettingsError(f"RatePAY settings file {path} has no [{TOML_TABLE}] table")
    base = dict(table)
    raw_profiles = base.pop(PROFILES_TABLE, {})
    if not isinstance(raw_profiles, dict) or not all(
        isinstance(v, dict) for v in raw_profiles.values()
    ):
        raise RatepaySettingsError(
            f"[{TOML_TABLE}.{PROFILES_TABLE}] in {path} must hold one table per profile"
        )
    return base, {str(k): dict(v) for k, v in raw_profiles.items()}


# --- what RatePAY says about a profile ------------------------------------------------------


@dataclass(frozen=True)
class MethodTerms:
    """One payment method of a profile (``…-<method>`` fields of ``master-data``)."""

    method: str
    activation_status: int | None
    eligible: bool
    tx_limit_min: Decimal | None
    tx_limit_max: Decimal | None
    tx_limit_max_b2b: Decimal | None
    b2b: bool
    delivery_address: bool

    @property
    def accepts_new_orders(self) -> bool:
        """Active (2) and eligible; phased out (3) still takes follow-ups, not new orders."""
        return self.activation_status == ACTIVE and self.eligible


@dataclass(frozen=True)
class ProfileData:
    """A PROFILE_REQUEST answer, as kept in the database (``master_data`` is the raw map)."""

    profile_id: str
    master_data: Mapping[str, str] = field(repr=False)
    merchant_name: str | None
    shop_name: str | None
    merchant_active: bool
    methods: Mapping[str, MethodTerms]
    billing_countries: tuple[str, ...]
    delivery_countries: tuple[str, ...]
    currencies: tuple[str, ...]

    @classmethod
    def from_master_data(cls, data: Mapping[str, str]) -> ProfileData:
        """Typed view of ``master-data``; a field RatePAY leaves out becomes ``None`` / no
        permission (unknown limits are not enforced, unknown permissions are refused)."""

        def flag(key: str) -> bool:
            return (data.get(key) or "").strip().lower() == "yes"

        methods = {}
        for method in METHODS:
            m = method.lower()
            methods[method] = MethodTerms(
                method=method,
                activation_status=_int(data.get(f"activation-status-{m}")),
                eligible=flag(f"eligibility-ratepay-{m}"),
                tx_limit_min=_dec(data.get(f"tx-limit-{m}-min")),
                tx_limit_max=_dec(data.get(f"tx-limit-{m}-max")),
                tx_limit_max_b2b=_dec(data.get(f"tx-limit-{m}-max-b2b")),
                b2b=flag(f"b2b-{m}"),
                delivery_address=flag(f"delivery-address-{m}"),
            )
        return cls(
            profile_id=data.get("profile-id", ""),
            master_data=dict(data),
            merchant_name=data.get("merchant-name"),
            shop_name=data.get("shop-name"),
            merchant_active=_int(data.get("merchant-status")) == 2,
            methods=methods,
            billing_countries=_csv(data.get("country-code-billing")),
            delivery_countries=_csv(data.get("country-code-delivery")),
            currencies=_csv(data.get("currency")),
        )


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip().upper() for p in (value or "").split(",") if p.strip())


def _int(value: str | None) -> int | None:
    try:
        return int((value or "").strip())
    except ValueError:
        return None


def _dec(value: str | None) -> Decimal | None:
    try:
        result = Decimal((value or "").strip())
    except InvalidOperation:
        return None
    return result if result.is_finite() else None
