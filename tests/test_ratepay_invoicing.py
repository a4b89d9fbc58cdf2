"""Invoicing dates on CONFIRMATION_DELIVER: converted to the shop's time zone (RatePAY's format
has no zone) and checked against RatePAY's window before anything is sent; debits and credits
as PAYMENT_CHANGE credit baskets."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from lxml import etree

from ratepay_oms.ratepay import (
    Basket,
    BasketPosition,
    Invoicing,
    RatepaySettings,
    RatepayValidationError,
)
from ratepay_oms.ratepay.builders import RequestBuilder, check_invoicing
from ratepay_oms.ratepay.codes import ChangeSubtype
from ratepay_oms.ratepay.xml import RATEPAY_NS, to_bytes

NS = {"r": RATEPAY_NS}
BASKET = Basket(shipping=BasketPosition(Decimal("4.95"), Decimal("19"), "Shipping"))


def _builder(zone: str) -> RequestBuilder:
    return RequestBuilder(
        RatepaySettings(profile_id="P", security_code="s" * 32, time_zone=zone)
    )


def _dates(zone: str, invoicing: Invoicing) -> dict[str, str]:
    built = _builder(zone).confirmation_deliver("31-1", BASKET, invoicing=invoicing)
    node = etree.fromstring(to_bytes(built.root)).find("r:content/r:invoicing", NS)
    return {etree.QName(c).localname: c.text for c in node}


def test_an_aware_datetime_is_sent_as_the_shops_local_time() -> None:
    # 23:30 UTC on 31 Dec is already 1 Jan in Berlin and still 31 Dec in New York.
    when = datetime(2025, 12, 31, 23, 30, tzinfo=UTC)
    assert _dates("Europe/Berlin", Invoicing("INV-1", invoice_date=when))["invoice-date"] == (
        "2026-01-01T00:30:00"
    )
    assert _dates("America/New_York", Invoicing("INV-1", invoice_date=when))[
        "invoice-date"
    ] == "2025-12-31T18:30:00"


def test_a_naive_datetime_is_utc_and_a_date_is_midnight() -> None:
    sent = _dates(
        "Europe/Zurich",
        Invoicing(
            "INV-2",
            invoice_date=datetime(2025, 7, 1, 8, 0),  # naive = UTC (summer: +2)
            delivery_date=date(2025, 7, 1),
            due_date=date(2025, 7, 15),
        ),
    )
    assert sent == {
        "invoice-id": "INV-2",
        "invoice-date": "2025-07-01T10:00:00",
        "delivery-date": "2025-07-01T00:00:00",
        "due-date": "2025-07-15T00:00:00",
    }


def test_a_delivery_in_the_future_is_refused_before_sending() -> None:
    tomorrow = datetime.now(UTC) + timedelta(days=2)
    with pytest.raises(RatepayValidationError, match=r"delivery date .* is in the future"):
        _dates("Europe/Berlin", Invoicing("INV-3", delivery_date=tomorrow))


def test_a_due_date_before_the_invoice_date_is_refused() -> None:
    zone = ZoneInfo("Europe/Berlin")
    with pytest.raises(RatepayValidationError, match="due date 2025-03-01 is before"):
        check_invoicing(
            Invoicing("INV-4", invoice_date=date(2025, 3, 2), due_date=date(2025, 3, 1)), zone
        )
    check_invoicing(
        Invoicing("INV-4", invoice_date=date(2025, 3, 2), due_date=date(2025, 3, 2)), zone
    )


def test_a_debit_is_a_positive_discount_and_a_credit_a_negative_one() -> None:
    builder = _builder("Europe/Berlin")
    for signed in (Decimal("-5.00"), Decimal("7.50")):
        built = builder.payment_change(
            ChangeSubtype.CREDIT,
            "31-1",
            Basket(discount=BasketPosition(signed, Decimal("19"), "Goodwill")),
        )
        doc = etree.fromstring(to_bytes(built.root))
        basket = doc.find("r:content/r:shopping-basket", NS)
        assert basket.get("amount") == f"{signed:.2f}"
        assert basket.find("r:discount", NS).get("unit-price-gross") == f"{signed:.2f}"
    with pytest.raises(RatepayValidationError, match="discount must be negative"):
        builder.payment_change(
            ChangeSubtype.RETURN,
            "31-1",
            Basket(discount=BasketPosition(Decimal("7.50"), Decimal("19"), "x")),
        )


# --------------------------------------------------------------------------- over HTTP


def _invoicing_xml(**dates: str):
    from ratepay_oms.sandbox.testing import _e, _sub

    node = _e("invoicing")
    _sub(node, "invoice-id", "INV-9")
    for tag, value in dates.items():
        _sub(node, tag.replace("_", "-"), value)
    return node


def _deliver_with(sandbox, invoicing):
    import requests

    from ratepay_oms.ratepay.xml import parse_xml
    from ratepay_oms.sandbox.testing import basket_xml, request_xml
    from tests.test_sandbox_protocol import authorised

    tx, _ = authorised(sandbox)
    body = request_xml(
        "CONFIRMATION_DELIVER",
        sandbox.settings,
        transaction_id=tx,
        content=[invoicing, basket_xml([("SKU-100", 1, "12.50")])],
    )
    root = parse_xml(requests.post(sandbox.url, data=body, timeout=5).content)
    p = root.find("r:head/r:processing", NS)
    return tx, int(p.find("r:reason", NS).get("code")), int(p.find("r:result", NS).get("code"))


def test_the_sandbox_refuses_a_zoned_date_and_a_due_date_before_the_invoice(sandbox) -> None:
    tx, reason, result = _deliver_with(
        sandbox, _invoicing_xml(invoice_date="2025-03-02T10:00:00+01:00")
    )
    assert (reason, result) == (200, 150)
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 0
    tx, reason, result = _deliver_with(
        sandbox, _invoicing_xml(invoice_date="2025-03-02T10:00:00", due_date="2025-03-01T00:00:00")
    )
    assert (reason, result) == (2004, 150)
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 0
    tx, reason, result = _deliver_with(
        sandbox, _invoicing_xml(invoice_date="2025-03-02T10:00:00", due_date="2025-03-16T00:00:00")
    )
    assert (reason, result) == (303, 404)
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 1


def test_invoicing_and_tracking_reach_the_gateway(sandbox) -> None:
    from ratepay_oms.ratepay import BasketItem, RatepayFacade, Tracking
    from ratepay_oms.ratepay.examples import MUG, ORDER_ID, example_basket, example_customer
    from ratepay_oms.ratepay.types import PaymentInfo

    facade = RatepayFacade(RatepaySettings.from_mapping(sandbox.settings))
    tx = facade.init_payment().transaction_id
    assert facade.request_payment(
        tx, example_customer(), example_basket(), PaymentInfo("INVOICE"), order_id=ORDER_ID
    ).success
    shipped = datetime(2025, 12, 31, 23, 30, tzinfo=UTC)
    result = facade.confirm_delivery(
        tx,
        Basket(items=(BasketItem(MUG.article_number, MUG.name, 1, MUG.unit_price_gross,
                                 MUG.tax_rate),)),
        order_id=ORDER_ID,
        invoicing=Invoicing("INV-2026-1", invoice_date=shipped, delivery_date=shipped,
                            due_date=date(2026, 1, 15)),
        tracking=[Tracking("DHL", "00340434"), Tracking("DHL", "00340435")],
    )
    assert result.success, result.reason_text
    sent = etree.fromstring(sandbox.gateway.received[-1].request_xml)
    assert sent.findtext("r:content/r:invoicing/r:invoice-id", namespaces=NS) == "INV-2026-1"
    assert sent.findtext("r:content/r:invoicing/r:invoice-date", namespaces=NS) == (
        "2026-01-01T00:30:00"  # Berlin
    )
    assert [
        (i.get("provider"), i.text)
        for i in sent.iterfind("r:head/r:external/r:tracking/r:id", NS)
    ] == [("DHL", "00340434"), ("DHL", "00340435")]
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 1
