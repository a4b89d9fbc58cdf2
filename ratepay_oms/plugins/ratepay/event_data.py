"""What a person gives with a manual event (``event ship REF --invoice-id … --tracking-id …``)
and what CONFIRMATION_DELIVER makes of it: the ``invoicing`` block and the ``tracking`` ids.

The data is a flat JSON object stored with the history rows of the move. Known keys:

| key | RatePAY field | rule |
|---|---|---|
| ``invoice_id`` | ``invoicing/invoice-id`` | ≤ 255 characters |
| ``invoice_date`` | ``invoicing/invoice-date`` | ISO date or date-time; default: event time |
| ``delivery_date`` | ``invoicing/delivery-date`` | ISO date or date-time; default: event time |
| ``due_date`` | ``invoicing/due-date`` | ISO date; default: invoice date + ``PAYMENT_TERM_DAYS`` |
| ``tracking_ids`` | ``external/tracking/id`` | list of parcel codes |
| ``carrier`` | ``…/id/@provider`` | one of RatePAY's providers (DHL, DPD, GLS, …) |

Any other key is kept with the history only. A date-time without an offset is the shop's local
time (``TIME_ZONE``): that is what a person at the shop means. Invoicing is sent when the data
names an invoice id or a date; tracking when it names tracking ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from ratepay_oms.errors import OmsError
from ratepay_oms.ratepay import Invoicing, RatepaySettings, Tracking
from ratepay_oms.ratepay.codes import TRACKING_PROVIDERS

INVOICING_KEYS = ("invoice_id", "invoice_date", "delivery_date", "due_date")
TRACKING_KEYS = ("tracking_ids", "carrier")
MAX_DATA_CHARS = 4000
"""Event data is a note for the history, not a document store."""


class EventDataError(OmsError):
    """Event data a person gave cannot be sent to RatePAY (names the key and what to do)."""


def check_event_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """The data as it will be stored, or ``EventDataError`` naming the bad key. Checked before
    the event fires, so a typo moves nothing."""
    import json

    if not isinstance(data, Mapping):
        raise EventDataError("event data must be an object of KEY=VALUE pairs")
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.strip():
            raise EventDataError("event data keys must be non-empty text")
        clean[key] = value
    for key in ("invoice_date", "delivery_date", "due_date"):
        if clean.get(key) is not None:
            _parse_when(key, clean[key])
    if clean.get("invoice_id") is not None:
        invoice = clean["invoice_id"]
        if not isinstance(invoice, str) or not invoice.strip() or len(invoice) > 255:
            raise EventDataError("invoice_id must be 1 to 255 characters")
    tracking = clean.get("tracking_ids")
    if tracking is not None:
        if isinstance(tracking, str):
            tracking = clean["tracking_ids"] = [tracking]
        if not isinstance(tracking, list) or not all(
            isinstance(t, str) and t.strip() for t in tracking
        ):
            raise EventDataError("tracking_ids must be a list of parcel codes")
        if not clean.get("carrier"):
            raise EventDataError(
                f"tracking ids need a carrier: one of {', '.join(sorted(TRACKING_PROVIDERS))}"
            )
    carrier = clean.get("carrier")
    if carrier is not None:
        carrier = clean["carrier"] = str(carrier).strip().upper()
        if carrier not in TRACKING_PROVIDERS:
            raise EventDataError(
                f"carrier {carrier!r} is not one RatePAY knows; use one of "
                f"{', '.join(sorted(TRACKING_PROVIDERS))} (OTH for any other)"
            )
    if len(json.dumps(clean, default=str)) > MAX_DATA_CHARS:
        raise EventDataError(f"event data is longer than {MAX_DATA_CHARS} characters")
    return clean


def _parse_when(key: str, value: Any) -> date | datetime:
    if isinstance(value, datetime | date):
        return value
    text = str(value).strip()
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
        return datetime.fromisoformat(text)
    except ValueError:
        raise EventDataError(
            f"{key} {text!r} is not an ISO date (2026-12-01) or date-time (2026-12-01T14:30)"
        ) from None


def _shop_time(value: date | datetime, zone: ZoneInfo) -> date | datetime:
    """A naive date-time from a person is the shop's local time."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=zone)
    return value


def delivery_details(
    data: Mapping[str, Any] | None, settings: RatepaySettings, now: datetime
) -> tuple[Invoicing | None, tuple[Tracking, ...]]:
    """The ``invoicing`` and ``tracking`` of a CONFIRMATION_DELIVER from the event data
    (``now``: the event's time, naive UTC as every engine time)."""
    if not data:
        return None, ()
    data = check_event_data(data)
    zone = ZoneInfo(settings.time_zone)
    tracking = tuple(
        Tracking(provider=data["carrier"], code=code.strip())
        for code in data.get("tracking_ids") or ()
    )
    if not any(data.get(key) is not None for key in INVOICING_KEYS):
        return None, tracking
    event_time = now if now.tzinfo is not None else now.replace(tzinfo=UTC)

    def when(key: str) -> date | datetime | None:
        raw = data.get(key)
        return None if raw is None else _shop_time(_parse_when(key, raw), zone)

    invoice_date = when("invoice_date") or event_time
    delivery_date = when("delivery_date") or event_time
    due_date = when("due_date")
    if due_date is None and settings.payment_term_days is not None:
        start = (
            invoice_date.astimezone(zone).date()
            if isinstance(invoice_date, datetime)
            else invoice_date
        )
        due_date = start + timedelta(days=settings.payment_term_days)
    return (
        Invoicing(
            invoice_id=data.get("invoice_id"),
            invoice_date=invoice_date,
            delivery_date=delivery_date,
            due_date=due_date,
        ),
        tracking,
    )
