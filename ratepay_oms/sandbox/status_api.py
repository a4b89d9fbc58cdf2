"""The sandbox's Transaction Status API and the OAuth2 server in front of it.

Shaped as RatePAY documents them (reference ``ratepay-transaction-status-api.md``), so the
client's reconciliation is tested against what production answers, not against a shape of our
own:

* ``POST /oauth/token`` with a JSON body ``{client_id, client_secret, audience, grant_type}``:
  200 ``{access_token, expires_in, token_type: "Bearer"}``; 401 for a wrong client, secret,
  audience or grant type; 400 for a body that is not a JSON object; 415 without a JSON
  content type.
* ``GET /order/status/v2/transactions/{id}[?include=…]``: 401 without a valid bearer token,
  415 without ``Content-Type: application/json``, 406 for an ``Accept`` that excludes JSON,
  404 for an unknown transaction (and for one that never got past PAYMENT_INIT: a status is
  only kept from the PAYMENT_REQUEST on), else 200 with ``general_order_information`` and —
  with ``include`` — ``basket`` and ``payment_information``.

Units per position come from the sandbox's ledger: ``open_items`` = ordered − delivered −
cancelled, ``shipped_items`` = delivered − returned, ``returned_items`` = returned; cancelled
units are in no list. ``status_lag_s`` hides deliveries, cancellations and returns younger
than that many seconds, the way a booking may not show yet inside RatePAY's
``maximum_processing_offset_in_hours``.

Values the documentation we could read does not give are the sandbox's own and marked so:
``payment_status`` (``ACCEPTED``, ``DECLINED``, ``PARTIALLY_DELIVERED``, ``DELIVERED``,
``CANCELLED``, ``CLOSED``) and the shape of ``current_special_items``.

Nothing here imports the client package: the sandbox must not share a mistake with it.
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from ratepay_oms.sandbox import ledger
from ratepay_oms.sandbox.ledger import PositionLedger, Transaction

TOKEN_PATH = "/oauth/token"
STATUS_PATH = "/order/status/v2/transactions"
JSON = "application/json"
GRANT_TYPE = "client_credentials"

DEMO_CLIENT_ID = "ratepay-oms-sandbox"
DEMO_CLIENT_SECRET = "c5b1e0a7f3d94b62a8e1c0d7f9b3a5e2"
"""The sandbox's default OAuth client: shaped like a real secret, valid nowhere else."""
DEFAULT_AUDIENCE = "https://api-integration.ratepay.com/order/status/v2/transactions"
"""RatePAY's integration audience, so a client in MODE test needs no OAUTH_AUDIENCE."""

PAYMENT_STATUS = {
    ledger.REQUESTED: "ACCEPTED",
    ledger.CONFIRMED: "ACCEPTED",
    ledger.PARTIALLY_DELIVERED: "PARTIALLY_DELIVERED",
    ledger.DELIVERED: "DELIVERED",
    ledger.CANCELLED: "CANCELLED",
    ledger.CLOSED: "CLOSED",
    ledger.DECLINED: "DECLINED",
}
"""The sandbox's ``payment_status`` per transaction state (RatePAY's values are not in the
documentation we could read)."""

INVISIBLE_STATES = frozenset({ledger.INITIALIZED, ledger.FAILED})
"""No status kept: INIT alone, or a PAYMENT_REQUEST that failed with 150 (start over)."""

_FIELD_OF_BOOKING = {
    ("CONFIRMATION_DELIVER", None): "delivered",
    ("PAYMENT_CHANGE", "cancellation"): "cancelled",
    ("PAYMENT_CHANGE", "return"): "returned",
}


@dataclass(frozen=True)
class OAuthConfig:
    """The one OAuth client the sandbox accepts, and how its answers look."""

    client_id: str = DEMO_CLIENT_ID
    client_secret: str = field(default=DEMO_CLIENT_SECRET, repr=False)
    audience: str = DEFAULT_AUDIENCE
    token_lifetime_s: int = 1800
    processing_offset_hours: int = 0
    """``maximum_processing_offset_in_hours`` in every answer (0: a status is final at once)."""
    status_lag_s: float = 0.0
    """Bookings younger than this are not shown yet (see the module docstring)."""


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    data: Any

    def body(self) -> bytes:
        return json.dumps(self.data, indent=2).encode()


class OAuthServer:
    """Issues and checks bearer tokens; thread-safe."""

    def __init__(self, config: OAuthConfig) -> None:
        self.config = config
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()
        self.issued = 0

    def token(self, content_type: str | None, body: bytes) -> HttpAnswer:
        if not _is_json(content_type):
            return HttpAnswer(415, {"error": "unsupported_media_type"})
        try:
            data = json.loads(body or b"null")
        except ValueError:
            return HttpAnswer(400, {"error": "invalid_request"})
        if not isinstance(data, dict):
            return HttpAnswer(400, {"error": "invalid_request"})
        cfg = self.config
        checks = (
            (data.get("grant_type"), GRANT_TYPE),
            (data.get("client_id"), cfg.client_id),
            (data.get("client_secret"), cfg.client_secret),
            (data.get("audience"), cfg.audience),
        )
        # Every field compared (constant time), so timing tells nothing about which failed.
        ok = True
        for given, expected in checks:
            ok &= isinstance(given, str) and hmac.compare_digest(
                given.encode(), expected.encode()
            )
        if not ok:
            return HttpAnswer(401, {"error": "access_denied", "error_description": "Unauthorized"})
        value = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[value] = time.monotonic() + cfg.token_lifetime_s
            self.issued += 1
        return HttpAnswer(
            200,
            {"access_token": value, "expires_in": cfg.token_lifetime_s, "token_type": "Bearer"},
        )

    def valid(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        value = authorization[len("Bearer ") :].strip()
        with self._lock:
            expires = self._tokens.get(value)
            return expires is not None and time.monotonic() < expires

    def revoke_all(self) -> None:
        """Forget every token (a client must fetch a new one: tests the 401 refresh)."""
        with self._lock:
            self._tokens.clear()


def _is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";")[0].strip().lower() == JSON


def _accepts_json(accept: str | None) -> bool:
    if accept is None:
        return True
    kinds = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(kinds & {JSON, "application/*", "*/*"})


def status_answer(
    oauth: OAuthServer,
    tx: Transaction | None,
    *,
    authorization: str | None,
    content_type: str | None,
    accept: str | None,
    include: str | None,
    now: datetime,
) -> HttpAnswer:
    """The answer to one status request (the caller holds the gateway lock)."""
    if not oauth.valid(authorization):
        return HttpAnswer(401, {"error": "unauthorized"})
    if not _is_json(content_type):
        return HttpAnswer(415, {"error": "unsupported_media_type"})
    if not _accepts_json(accept):
        return HttpAnswer(406, {"error": "not_acceptable"})
    lag = timedelta(seconds=oauth.config.status_lag_s)
    if tx is None or tx.state in INVISIBLE_STATES or tx.requested_at is None:
        return HttpAnswer(404, {"error": "TRANSACTION_NOT_FOUND"})
    return HttpAnswer(200, render(tx, oauth.config, include, now - lag))


def _visible_positions(tx: Transaction, seen_until: datetime) -> dict[str, PositionLedger]:
    """The ledger without the bookings younger than ``seen_until`` (not processed yet)."""
    positions = {k: PositionLedger(**vars(p)) for k, p in tx.positions.items()}
    for booking in tx.bookings:
        if booking.time <= seen_until:
            continue
        column = _FIELD_OF_BOOKING.get((booking.operation, booking.subtype))
        if column is None:
            continue
        for key, units in booking.positions.items():
            pos = positions.get(key)
            if pos is not None:
                setattr(pos, column, getattr(pos, column) - units)
    return positions


def _number(value: Decimal) -> float:
    """A JSON number for an amount (two places are exact in a float's shortest repr)."""
    return float(ledger.money(value))


def _item(pos: PositionLedger, quantity: int) -> dict[str, Any]:
    return {
        "unit_price_gross": _number(pos.unit_price_gross),
        "tax_rate": _number(pos.tax_rate),
        "discount": _number(pos.discount),
        "quantity": quantity,
        "description": pos.name,
        "additional_description": None,
        "identification_number": pos.article_number,
        "unique_identification_number": pos.unique_article_number or None,
    }


def render(
    tx: Transaction, cfg: OAuthConfig, include: str | None, seen_until: datetime
) -> dict[str, Any]:
    """The documented 200 answer; ``include`` is ``all`` or a comma list of parts."""
    parts = {p.strip() for p in (include or "").split(",") if p.strip()}
    if "all" in parts:
        parts = {"payment_status", "payment_method", "dunning_status", "basket"}
    answer: dict[str, Any] = {
        "general_order_information": {
            "transaction_id": tx.transaction_id,
            "shop_order_id": tx.order_id,
            "order_creation_date": tx.created.isoformat(timespec="seconds"),
            "shop_buyer_id": tx.merchant_consumer_id,
            "currency": tx.currency,
        }
    }
    if "basket" in parts:
        positions = _visible_positions(tx, seen_until)
        lists: dict[str, list[dict[str, Any]]] = {
            "open_items": [],
            "shipped_items": [],
            "returned_items": [],
        }
        specials: dict[str, list[dict[str, Any]]] = {
            "open_items": [],
            "shipped_items": [],
            "returned_items": [],
        }
        current = ledger.ZERO
        for pos in positions.values():
            kept = pos.ordered - pos.cancelled - pos.returned
            current += pos.value(kept)
            for name, units in (
                ("open_items", pos.open),
                ("shipped_items", pos.delivered - pos.returned),
                ("returned_items", pos.returned),
            ):
                if pos.kind == "item" and units:
                    lists[name].append(_item(pos, int(units)))
                elif pos.kind != "item" and units:
                    specials[name].append(
                        {"type": pos.kind, "description": pos.name,
                         "amount": _number(Decimal(units))}
                    )
        last = max((b.time for b in tx.bookings if b.time <= seen_until), default=None)
        answer["basket"] = {
            "initial_order_amount_gross": _number(tx.initial_amount),
            "current_order_amount_gross": _number(current + tx.credited),
            "last_updated": (last or tx.requested_at or tx.created).isoformat(timespec="seconds"),
            "current_items": [{"shop_id": None, "shop_items": lists}],
            "current_special_items": specials,
        }
    payment: dict[str, Any] = {}
    if parts & {"payment_status", "payment_method", "dunning_status"}:
        payment["maximum_processing_offset_in_hours"] = cfg.processing_offset_hours
    if "payment_status" in parts:
        payment["payment_status"] = PAYMENT_STATUS.get(tx.state, tx.state.upper())
    if "payment_method" in parts:
        payment["payment_method"] = tx.payment_method
    if "dunning_status" in parts:
        payment["dunning_status"] = "NO_DUNNING"
    if payment:
        answer["payment_information"] = payment
    return answer
