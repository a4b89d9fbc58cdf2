"""The configured RatePAY profiles at work: one facade per profile, the stored PROFILE_REQUEST
answers (``ratepay_profile``, written only by ``refresh``), which profile an order uses, and
the check of an order against its profile before the PAYMENT_REQUEST.

RatePAY refuses an order outside its profile's contract with 2001/2002/2005/2006 (reference
§4.3, §6.3) — after a PAYMENT_INIT and a PAYMENT_REQUEST that count as one of the shopper's
three attempts a day. The profile says the same in advance (§4.7), so an order that breaks it
is refused here, with the reason, without a call.

The stored answers are read for every PAYMENT_REQUEST plan, so they are kept in memory per
database engine (:func:`kept_profiles`) for at most :data:`PROFILES_TTL_S` seconds; see there
for why a short time-to-live and not a change marker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ratepay_oms.errors import OmsError
from ratepay_oms.orders import Address, OrderInput
from ratepay_oms.persistence.payment import RatepayProfile
from ratepay_oms.ratepay import RatepayFacade
from ratepay_oms.ratepay.profiles import (
    DEFAULT_PROFILE,
    PHASED_OUT,
    ProfileData,
    ProfileSet,
    UnknownProfileError,
)

log = logging.getLogger(__name__)

PROFILES_SERVICE = "ratepay_profiles"
"""Key of the ``RatepayProfiles`` in the engine's ``services`` (next to ``"ratepay"``, the
default profile's facade)."""


class ProfileRefreshError(OmsError):
    """RatePAY did not answer a PROFILE_REQUEST with the profile (wrong credential, outage)."""


@dataclass
class RatepayProfiles:
    """One facade per configured profile; ``facade(None)`` is the default profile's."""

    profiles: ProfileSet
    facades: Mapping[str, RatepayFacade]

    def facade(self, name: str | None) -> RatepayFacade:
        self.profiles[name or self.profiles.default]  # unknown name → UnknownProfileError
        return self.facades[name or self.profiles.default]


def profiles_of(services: Mapping[str, Any]) -> RatepayProfiles | None:
    """The profiles the engine was given: ``services["ratepay_profiles"]``, else the single
    facade ``services["ratepay"]`` as the one profile ``default``; ``None`` without RatePAY."""
    found = services.get(PROFILES_SERVICE)
    if isinstance(found, RatepayProfiles):
        return found
    facade = services.get("ratepay")
    if facade is None:
        return None
    return RatepayProfiles(ProfileSet.single(facade.settings), {DEFAULT_PROFILE: facade})


# --- stored answers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredProfile:
    name: str
    profile_id: str
    data: ProfileData
    installment_config: dict[str, str]
    refreshed_at: datetime


def stored_profiles(session: Session) -> dict[str, StoredProfile]:
    rows = session.scalars(select(RatepayProfile).order_by(RatepayProfile.name))
    return {
        row.name: StoredProfile(
            name=row.name,
            profile_id=row.profile_id,
            data=ProfileData.from_master_data(json.loads(row.master_data)),
            installment_config=json.loads(row.installment_config or "{}"),
            refreshed_at=row.refreshed_at,
        )
        for row in rows
    }


PROFILES_TTL_S = 5.0
"""How long a tick worker plans with the stored answers it read (seconds): a ``profile
refresh`` by another process reaches it within this time; one by this process at once."""


@dataclass(frozen=True)
class KeptProfiles:
    """The stored answers as one process keeps them for a while (read only)."""

    stored: Mapping[str, StoredProfile]
    data: Mapping[str, ProfileData]
    """``stored``'s master data by name, as ``ProfileSet.choose`` takes it."""
    loaded_at: float
    """``time.monotonic()`` when read."""


_KEPT: WeakKeyDictionary[Engine, KeptProfiles] = WeakKeyDictionary()
_KEPT_LOCK = threading.Lock()
"""A worker's pool threads share the kept answers."""
_changes = 0
"""How often this process changed stored answers (:func:`forget_profiles`): an answer read
before a change is not kept after it."""


def kept_profiles(session: Session) -> KeptProfiles:
    """The stored answers as :func:`stored_profiles` reads them, read again at most every
    :data:`PROFILES_TTL_S` seconds per database engine.

    Every payment-request plan needs them, and reading the table through the ORM and parsing
    its JSON for each order was a fortieth of a tick worker's CPU; they change only by ``profile
    refresh`` (``refresh`` is the one writer), a few times a year. Why a time-to-live and not
    a change marker read along with a statement the plan already makes: on an order's first
    plan the only statement left is the payment row's INSERT, and a marker on it would tie
    the profile table to the payment statements on three dialects for no gain a person could
    notice. What the delay can change is harmless: an order planned within the time-to-live
    after a refresh by another process is checked against the answer before it, exactly as
    if it had been planned a few seconds earlier (a refused order can be retried; one that
    goes out is refused by RatePAY itself if the new answer forbids it). ``refresh`` in this
    process forgets every kept answer when it commits (:func:`forget_profiles`; whatever
    engine object it wrote through), so a transaction begun after it reads the new ones."""
    engine = session.get_bind().engine
    now = time.monotonic()
    kept = _KEPT.get(engine)
    if kept is not None and 0 <= now - kept.loaded_at < PROFILES_TTL_S:
        return kept
    changes = _changes
    stored = stored_profiles(session)
    kept = KeptProfiles(
        MappingProxyType(stored),
        MappingProxyType({name: s.data for name, s in stored.items()}),
        now,
    )
    with _KEPT_LOCK:
        if _changes == changes:  # not changed by this process while it was read
            _KEPT[engine] = kept
    return kept


def forget_profiles() -> None:
    """Drop every stored answer this process keeps: they were just changed."""
    global _changes
    with _KEPT_LOCK:
        _changes += 1
        _KEPT.clear()


def refresh(
    session_factory: Callable[[], Session],
    profiles: RatepayProfiles,
    names: Iterable[str] | None,
    now: datetime,
) -> list[StoredProfile]:
    """PROFILE_REQUEST for each named profile (all when ``names`` is None) and keep the
    answers. All calls are made first, outside any transaction; the answers are written in one
    transaction, so a failing profile leaves every stored answer as it was."""
    wanted = list(profiles.profiles.names if names is None else names)
    for name in wanted:
        profiles.profiles[name]  # unknown → UnknownProfileError before any call
    answers: list[tuple[str, dict[str, str], dict[str, str]]] = []
    for name in wanted:
        result = profiles.facade(name).request_profile()
        if not result.success or not result.master_data:
            raise ProfileRefreshError(
                f"PROFILE_REQUEST of profile {name} failed: "
                f"{result.reason_code} {result.reason_text or result.result_text or ''}".rstrip()
                + "; nothing stored"
            )
        answers.append((name, result.master_data, result.installment_configuration))
    with session_factory() as session, session.begin():
        for name, master, installment in answers:
            row = session.scalar(select(RatepayProfile).where(RatepayProfile.name == name))
            if row is None:
                row = RatepayProfile(name=name)
                session.add(row)
            row.profile_id = master.get("profile-id", profiles.profiles[name].profile_id)
            row.master_data = json.dumps(master, sort_keys=True)
            row.installment_config = json.dumps(installment, sort_keys=True)
            row.refreshed_at = now
    forget_profiles()  # committed: this process plans with the new answers at once
    with session_factory() as session:
        stored = stored_profiles(session)
    log.info("RatePAY profiles refreshed: %s", ", ".join(wanted))
    return [stored[name] for name in wanted]


# --- which profile, and does the order fit it -------------------------------------------------


def choose_profile(
    profiles: RatepayProfiles, order: OrderInput, stored: Mapping[str, StoredProfile]
) -> str:
    """The profile name for ``order``: ``payment.profile``, else by billing country and
    currency (``ProfileSet.choose``)."""
    return _choose(profiles, order, {name: s.data for name, s in stored.items()})


def _choose(profiles: RatepayProfiles, order: OrderInput, data: Mapping[str, ProfileData]) -> str:
    return profiles.profiles.choose(
        explicit=order.payment.profile,
        country=order.customer.billing_address.country_code,
        currency=order.currency,
        stored=data,
    )


@dataclass(frozen=True)
class Violation:
    """Why an order breaks its profile, with the reason code RatePAY would have answered."""

    reason_code: int
    text: str


def _place(a: Address) -> tuple[str, ...]:
    """Where a parcel goes (name and company do not change the place)."""
    return tuple(
        " ".join((v or "").split()).casefold()
        for v in (a.street, a.street_additional, a.street_number, a.zip_code, a.city,
                  a.country_code)
    )


def check_order(profile: ProfileData, order: OrderInput, amount: Decimal) -> Violation | None:
    """The first rule of the profile ``order`` breaks, or ``None``.

    In the order RatePAY checks them: the profile and the method are active (120; phased out =
    no new orders), billing and delivery country and currency are served (2100, 2101, 200),
    the basket ``amount`` lies within the method's limits (2005/2006, for a company
    ``tx-limit-…-max-b2b``), a delivery address at another place is allowed (2001), a company
    may use the method (2002). A limit the profile does not report is not enforced.
    """
    method = order.payment.method
    terms = profile.methods.get(method)
    customer = order.customer
    if not profile.merchant_active:
        return Violation(120, f"profile {profile.profile_id} is not active")
    if terms is None or not terms.accepts_new_orders:
        state = (
            "phased out (no new orders)"
            if terms is not None and terms.activation_status == PHASED_OUT
            else "not active"
        )
        return Violation(120, f"{method} is {state} for profile {profile.profile_id}")
    billing = customer.billing_address.country_code
    if billing not in profile.billing_countries:
        return Violation(
            2100,
            f"billing country {billing} is not served by profile {profile.profile_id} "
            f"({', '.join(profile.billing_countries) or 'none'})",
        )
    delivery = customer.delivery_address
    if delivery is not None and delivery.country_code not in profile.delivery_countries:
        return Violation(
            2101,
            f"delivery country {delivery.country_code} is not served by profile "
            f"{profile.profile_id} ({', '.join(profile.delivery_countries) or 'none'})",
        )
    if order.currency not in profile.currencies:
        return Violation(
            200,
            f"currency {order.currency} is not served by profile {profile.profile_id} "
            f"({', '.join(profile.currencies) or 'none'})",
        )
    b2b = customer.is_b2b
    high = terms.tx_limit_max_b2b if b2b else terms.tx_limit_max
    if terms.tx_limit_min is not None and amount < terms.tx_limit_min:
        return Violation(2005, f"{amount} is below the {method} minimum {terms.tx_limit_min}")
    if high is not None and amount > high:
        return Violation(
            2006, f"{amount} is above the {method} maximum{' for companies' if b2b else ''} {high}"
        )
    if (
        delivery is not None
        and _place(delivery) != _place(customer.billing_address)
        and not terms.delivery_address
    ):
        return Violation(2001, f"{method} does not allow a delivery address other than billing")
    if b2b and not terms.b2b:
        return Violation(2002, f"{method} is not allowed for companies (B2B)")
    return None


__all__ = [
    "PROFILES_SERVICE",
    "PROFILES_TTL_S",
    "KeptProfiles",
    "ProfileDecision",
    "ProfileRefreshError",
    "RatepayProfiles",
    "StoredProfile",
    "UnknownProfileError",
    "Violation",
    "check_order",
    "choose_profile",
    "decide_profile",
    "forget_profiles",
    "kept_profiles",
    "profiles_of",
    "refresh",
    "stored_profiles",
]


@dataclass(frozen=True)
class ProfileDecision:
    """The profile an order's PAYMENT_REQUEST goes out with, or why it must not go out."""

    name: str | None
    facade: RatepayFacade | None
    violation: Violation | None


def decide_profile(
    session: Session, services: Mapping[str, Any], order: OrderInput
) -> ProfileDecision:
    """Choose the order's profile and check the order against its stored PROFILE_REQUEST
    answer (database only: the planning step of the PAYMENT_REQUEST). An order no profile
    serves, or naming an unknown one, is a violation too (200), so it is refused with the
    reason instead of retried forever. The stored answers as kept for a few seconds
    (:func:`kept_profiles`)."""
    profiles = profiles_of(services)
    if profiles is None:
        return ProfileDecision(None, None, None)
    answers = kept_profiles(session)
    try:
        name = _choose(profiles, order, answers.data)
    except UnknownProfileError as exc:
        return ProfileDecision(None, None, Violation(200, str(exc)))
    facade = profiles.facade(name)
    kept = answers.stored.get(name)
    if kept is None or kept.profile_id != profiles.profiles[name].profile_id:
        return ProfileDecision(name, facade, None)  # never refreshed (or for another id)
    return ProfileDecision(name, facade, check_order(kept.data, order, order.basket_amount))
