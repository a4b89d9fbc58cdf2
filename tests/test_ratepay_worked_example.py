"""The reference's worked example (order 100045, ratepay-xml-api.md §8), built by our builders.

The expected figures below are transcribed by hand from the reference's §8 ledger table and
request samples; the test parses our XML and compares, so a change in basket arithmetic,
element order or subtype naming fails here.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from lxml import etree

from ratepay_oms.ratepay import Basket, Invoicing, RatepaySettings, Tracking
from ratepay_oms.ratepay.builders import RequestBuilder
from ratepay_oms.ratepay.codes import ChangeSubtype
from ratepay_oms.ratepay.examples import (
    MUG,
    ORDER_ID,
    SHIPPING,
    TEA_POT,
    VOUCHER,
    example_basket,
    example_customer,
    lines,
)
from ratepay_oms.ratepay.types import BasketPosition, PaymentInfo
from ratepay_oms.ratepay.xml import RATEPAY_NS, to_bytes

NS = {"r": RATEPAY_NS}
TX = "31-202401151000042"


@pytest.fixture
def builder() -> RequestBuilder:
    return RequestBuilder(
        RatepaySettings(
            profile_id="MY_PROFILE_ID",
            security_code="0123456789abcdef0123456789abcdef",
            system_id="shop01.example.org",
        )
    )


def summary(root: etree._Element) -> dict:
    """Operation, subtype, basket amount and positions of a built request, from its bytes."""
    doc = etree.fromstring(to_bytes(root))
    op = doc.find("r:head/r:operation", NS)
    basket = doc.find("r:content/r:shopping-basket", NS)
    out: dict = {"operation": op.text, "subtype": op.get("subtype")}
    if basket is not None:
        out["amount"] = basket.get("amount")
        out["items"] = [
            (
                i.get("article-number"),
                i.get("quantity"),
                i.get("unit-price-gross"),
                i.get("discount"),
            )
            for i in basket.findall("r:items/r:item", NS)
        ]
        shipping = basket.find("r:shipping", NS)
        discount = basket.find("r:discount", NS)
        out["shipping"] = shipping.get("unit-price-gross") if shipping is not None else None
        out["discount"] = discount.get("unit-price-gross") if discount is not None else None
    return out


def test_worked_example_order_100045_matches_the_reference(builder: RequestBuilder) -> None:
    b = builder
    requests = [
        b.payment_init(),
        b.payment_request(
            TX, example_customer(), example_basket(), PaymentInfo("INVOICE"), order_id=ORDER_ID
        ),
        b.confirmation_deliver(
            TX,
            Basket(items=lines((MUG, 2)), shipping=SHIPPING),
            order_id=ORDER_ID,
            tracking=[Tracking("DHL", "00340434161094021234")],
        ),
        b.payment_change(
            ChangeSubtype.CANCELLATION, TX, Basket(items=lines((MUG, 1))), order_id=ORDER_ID
        ),
        b.confirmation_deliver(
            TX, Basket(items=lines((TEA_POT, 1)), discount=VOUCHER), order_id=ORDER_ID
        ),
        b.payment_change(
            ChangeSubtype.RETURN, TX, Basket(items=lines((MUG, 1))), order_id=ORDER_ID
        ),
        b.payment_change(
            ChangeSubtype.CREDIT,
            TX,
            Basket(discount=BasketPosition(Decimal("-7.50"), Decimal("19"), "Goodwill")),
            order_id=ORDER_ID,
        ),
    ]
    got = [summary(r.root) for r in requests]
    # transcribed from §8 (ledger table; 8.1, 8.2, 8.4, 8.5, 8.6, 8.7, 8.8)
    expected = [
        {"operation": "PAYMENT_INIT", "subtype": None},
        {
            "operation": "PAYMENT_REQUEST",
            "subtype": None,
            "amount": "82.45",
            "items": [("SKU-100", "3", "12.50", None), ("SKU-200", "1", "49.90", "-4.90")],
            "shipping": "4.95",
            "discount": "-5.00",
        },
        {
            "operation": "CONFIRMATION_DELIVER",
            "subtype": None,
            "amount": "29.95",
            "items": [("SKU-100", "2", "12.50", None)],
            "shipping": "4.95",
            "discount": None,
        },
        {
            "operation": "PAYMENT_CHANGE",
            "subtype": "cancellation",
            "amount": "12.50",
            "items": [("SKU-100", "1", "12.50", None)],
            "shipping": None,
            "discount": None,
        },
        {
            "operation": "CONFIRMATION_DELIVER",
            "subtype": None,
            "amount": "40.00",
            "items": [("SKU-200", "1", "49.90", "-4.90")],
            "shipping": None,
            "discount": "-5.00",
        },
        {
            "operation": "PAYMENT_CHANGE",
            "subtype": "return",
            "amount": "12.50",
            "items": [("SKU-100", "1", "12.50", None)],
            "shipping": None,
            "discount": None,
        },
        {
            "operation": "PAYMENT_CHANGE",
            "subtype": "credit",
            "amount": "-7.50",
            "items": [],
            "shipping": None,
            "discount": "-7.50",
        },
    ]
    assert got == expected
    # invoiced balance after each step (§8 table): 29.95, 29.95, 69.95, 57.45, 49.95
    balance = Decimal("0")
    balances = []
    for s in got[2:]:
        sign = {"CONFIRMATION_DELIVER": 1, "cancellation": 0, "return": -1, "credit": 1}
        factor = sign.get(s["subtype"] or s["operation"])
        balance += factor * Decimal(s["amount"])
        balances.append(str(balance))
    assert balances == ["29.95", "29.95", "69.95", "57.45", "49.95"]


def test_payment_request_follows_the_documented_element_order(builder: RequestBuilder) -> None:
    built = builder.payment_request(
        TX,
        example_customer(),
        example_basket(),
        PaymentInfo("INVOICE"),
        order_id=ORDER_ID,
        merchant_consumer_id="C-7781",
        device_token="5f1c0d3a9b7e4c21a8d6e0f4b2c9a713",
    )
    doc = etree.fromstring(to_bytes(built.root))

    def children(path: str) -> list[str]:
        return [etree.QName(c).localname for c in doc.find(path, NS)]

    assert doc.get("version") == "1.0"
    assert children("r:head") == [
        "system-id", "transaction-id", "operation", "credential", "external",
        "customer-device", "meta",
    ]  # fmt: skip
    assert children("r:head/r:external") == ["order-id", "merchant-consumer-id"]
    assert children("r:content") == ["customer", "shopping-basket", "payment"]
    assert children("r:content/r:customer") == [
        "first-name", "last-name", "gender", "date-of-birth", "ip-address", "contacts",
        "addresses", "nationality", "customer-allow-credit-inquiry",
    ]  # fmt: skip
    assert children("r:content/r:customer/r:addresses/r:address") == [
        "street", "street-number", "zip-code", "city", "country-code",
    ]  # fmt: skip
    assert children("r:content/r:shopping-basket") == ["items", "shipping", "discount"]
    assert doc.findtext("r:content/r:payment/r:amount", namespaces=NS) == "82.45"
    assert doc.find("r:content/r:payment", NS).get("method") == "INVOICE"
    assert doc.findtext("r:head/r:meta/r:systems/r:api-version", namespaces=NS) == "1.8"


def test_delivery_with_invoicing_puts_invoicing_before_the_basket(builder: RequestBuilder) -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    # The shop's local time (TIME_ZONE, default Europe/Berlin) is what RatePAY reads.
    local = datetime(2024, 1, 16, 9, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    built = builder.confirmation_deliver(
        TX,
        Basket(items=lines((MUG, 2)), shipping=SHIPPING),
        order_id=ORDER_ID,
        invoicing=Invoicing("INV-2024-000311", invoice_date=local),
        tracking=[Tracking("DHL", "00340434161094021234")],
    )
    doc = etree.fromstring(to_bytes(built.root))
    assert [etree.QName(c).localname for c in doc.find("r:content", NS)] == [
        "invoicing",
        "shopping-basket",
    ]
    assert doc.findtext("r:content/r:invoicing/r:invoice-date", namespaces=NS) == (
        "2024-01-16T09:30:00"
    )
    tracking = doc.find("r:head/r:external/r:tracking/r:id", NS)
    assert (tracking.get("provider"), tracking.text) == ("DHL", "00340434161094021234")
