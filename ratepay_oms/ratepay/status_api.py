"""RatePAY's Transaction Status API: the OAuth2 token and the typed reading of its answer.

Reconciliation asks it what RatePAY booked when a booking call's answer was lost (reference
``ratepay-transaction-status-api.md``). Two parts live here, both free of HTTP details:

* ``TokenCache`` keeps one client-credentials token and hands it out until shortly before it
  expires (``REFRESH_MARGIN_S``, or a tenth of a short lifetime); the facade drops it on a 401
  and asks once more with a fresh one.
* ``read_status`` turns the documented 200 answer into a ``StatusReport``: per position
  (``identification_number`` = our ``article-number``, ``unique_identification_number`` = our
  ``unique-article-number``, keyed ``"article/unique"`` like the request's positions) the units
  RatePAY lists as open, shipped and returned, summed over every shop of a marketplace answer.
  Anything malformed is a ``RatepayTransportError``: a verdict is never built on a guess.

The client secret and the access token never leave this module in a message.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from ratepay_oms.ratepay.errors import RatepayError, RatepayTransportError

OAUTH_OPERATION = "OAUTH_TOKEN"
STATUS_OPERATION = "TRANSACTION_STATUS"
INCLUDE = "all"
"""``?include=all``: payment status, method, dunning status and basket (without it only the
general order information comes back)."""

REFRESH_MARGIN_S = 60.0
"""A token is renewed this long before it expires (a tenth of its lifetime if that is less)."""


class StatusApiAuthError(RatepayError):
    """The OAuth server refused our client, or the status API refused a fresh token.

    A configuration problem (client id / secret / audience), not a lost answer: the message
    names the settings to check and never contains the secret.
    """


@dataclass
class _Token:
    value: str
    expires_at: float


class TokenCache:
    """One cached bearer token, renewed shortly before it expires. Thread-safe."""

    def __init__(
        self,
        fetch: Callable[[], tuple[str, float]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self.fetched = 0
        """How many tokens were requested (tests and the API log read it)."""

    def get(self) -> str:
        with self._lock:
            token = self._token
            if token is None or self._clock() >= token.expires_at:
                value, lifetime = self._fetch()
                self.fetched += 1
                margin = min(REFRESH_MARGIN_S, lifetime / 10)
                token = _Token(value, self._clock() + lifetime - margin)
                self._token = token
            return token.value

    def drop(self, value: str) -> None:
        """Forget ``value`` (answered 401); a newer token fetched meanwhile is kept."""
        with self._lock:
            if self._token is not None and self._token.value == value:
                self._token = None

    @property
    def current(self) -> str | None:
        """The cached token, for masking texts that might echo it."""
        token = self._token
        return token.value if token is not None else None


def token_request_body(client_id: str, client_secret: str, audience: str) -> bytes:
    """The documented client-credentials request (JSON, not form-encoded)."""
    return json.dumps(
        {
            "client_id": client_id,
            "client_secret": client_secret,
            "audience": audience,
            "grant_type": "client_credentials",
        }
    ).encode()


def read_token(body: bytes) -> tuple[str, float]:
    """``(access_token, expires_in seconds)`` from a 200 token answer."""
    data = _json_object(body, OAUTH_OPERATION)
    token = data.get("access_token")
    lifetime = data.get("expires_in")
    kind = str(data.get("token_type", "Bearer"))
    if not isinstance(token, str) or not token:
        raise RatepayTransportError(
            f"{OAUTH_OPERATION}: answer has no access_token", sent=True, operation=OAUTH_OPERATION
        )
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | Decimal) or lifetime <= 0:
        raise RatepayTransportError(
            f"{OAUTH_OPERATION}: answer has no positive expires_in",
            sent=True,
            operation=OAUTH_OPERATION,
        )
    if kind.lower() != "bearer":
        raise RatepayTransportError(
            f"{OAUTH_OPERATION}: token_type {kind[:20]!r} is not Bearer",
            sent=True,
            operation=OAUTH_OPERATION,
        )
    return token, float(lifetime)


def mask_token_answer(body: bytes | None) -> str | None:
    """The token answer for the API log with the access token replaced."""
    if body is None:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return "(token answer is not JSON)"
    if isinstance(data, dict) and "access_token" in data:
        data["access_token"] = "********"
    return json.dumps(data)


# --------------------------------------------------------------------------- the answer


@dataclass(frozen=True)
class PositionFigures:
    """What the status answer lists for one position, in units."""

    open: int = 0
    shipped: int = 0
    returned: int = 0

    @property
    def delivered(self) -> int:
        """Units delivered at some point: a returned unit was shipped first."""
        return self.shipped + self.returned

    def cancelled(self, ordered: int) -> int:
        """Cancelled units leave ``open_items`` and appear in no list (reference, [INF])."""
        return ordered - self.open - self.shipped - self.returned

    def __add__(self, other: PositionFigures) -> PositionFigures:
        return PositionFigures(
            self.open + other.open,
            self.shipped + other.shipped,
            self.returned + other.returned,
        )


@dataclass(frozen=True)
class StatusReport:
    """The status API's word on one transaction. ``found`` False: it answered 404."""

    transaction_id: str
    found: bool
    shop_order_id: str | None = None
    currency: str | None = None
    payment_status: str | None = None
    payment_method: str | None = None
    processing_offset_hours: Decimal | None = None
    initial_amount: Decimal | None = None
    current_amount: Decimal | None = None
    positions: Mapping[str, PositionFigures] = field(default_factory=dict)


def position_key(identification_number: str, unique_identification_number: str | None) -> str:
    """The key our requests use for a position (``article-number[/unique-article-number]``)."""
    if unique_identification_number:
        return f"{identification_number}/{unique_identification_number}"
    return identification_number


def read_status(transaction_id: str, body: bytes) -> StatusReport:
    """A ``StatusReport`` from the 200 answer; ``RatepayTransportError`` when it is malformed."""
    data = _json_object(body, STATUS_OPERATION)
    general = _object(data.get("general_order_information", {}), "general_order_information")
    payment = _object(data.get("payment_information", {}), "payment_information")
    basket = _object(data.get("basket", {}), "basket")
    answered_id = general.get("transaction_id")
    if answered_id is not None and str(answered_id) != transaction_id:
        raise _malformed(f"answer is about transaction {str(answered_id)[:40]!r}")
    positions: dict[str, PositionFigures] = {}
    shops = basket.get("current_items", [])
    if not isinstance(shops, list):
        raise _malformed("basket.current_items is not a list")
    for shop in shops:
        items = _object(_object(shop, "current_items[]").get("shop_items", {}), "shop_items")
        for list_name, figure in (
            ("open_items", "open"),
            ("shipped_items", "shipped"),
            ("returned_items", "returned"),
        ):
            listed = items.get(list_name, [])
            if not isinstance(listed, list):
                raise _malformed(f"shop_items.{list_name} is not a list")
            for entry in listed:
                item = _object(entry, list_name + "[]")
                number = item.get("identification_number")
                if not isinstance(number, str | int) or str(number) == "":
                    raise _malformed(f"an entry of {list_name} has no identification_number")
                unique = item.get("unique_identification_number")
                key = position_key(str(number), str(unique) if unique else None)
                quantity = item.get("quantity")
                if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0:
                    raise _malformed(f"{list_name} entry {key!r} has no whole quantity")
                positions[key] = positions.get(key, PositionFigures()) + PositionFigures(
                    **{figure: quantity}
                )
    return StatusReport(
        transaction_id=transaction_id,
        found=True,
        shop_order_id=_text(general.get("shop_order_id")),
        currency=_text(general.get("currency")),
        payment_status=_text(payment.get("payment_status")),
        payment_method=_text(payment.get("payment_method")),
        processing_offset_hours=_decimal(
            payment.get("maximum_processing_offset_in_hours"), "maximum_processing_offset_in_hours"
        ),
        initial_amount=_decimal(
            basket.get("initial_order_amount_gross"), "initial_order_amount_gross"
        ),
        current_amount=_decimal(
            basket.get("current_order_amount_gross"), "current_order_amount_gross"
        ),
        positions=positions,
    )


def _malformed(what: str) -> RatepayTransportError:
    return RatepayTransportError(
        f"{STATUS_OPERATION}: {what}", sent=True, operation=STATUS_OPERATION
    )


def _json_object(body: bytes, operation: str) -> dict[str, Any]:
    try:
        data = json.loads(body, parse_float=Decimal)
    except ValueError:
        raise RatepayTransportError(
            f"{operation}: answer is not JSON", sent=True, operation=operation
        ) from None
    if not isinstance(data, dict):
        raise RatepayTransportError(
            f"{operation}: answer is not a JSON object", sent=True, operation=operation
        )
    return data


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(f"{where} is not an object")
    return value


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _decimal(value: Any, where: str) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise _malformed(f"{where} is not a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise _malformed(f"{where} is not a number") from None
    if not number.is_finite():
        raise _malformed(f"{where} is not a number")
    return number
