"""Intake rules RatePAY would otherwise answer with a refusal after the order was placed:
order reference length, IBAN / BIC / mandate reference, device token format, B2B company
details and delivery types — and that what is accepted reaches RatePAY where it documents it.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from lxml import etree

from ratepay_oms.cli import _mount, cli
from ratepay_oms.demo import demo_engine, example_order
from ratepay_oms.orders import OrderInputError, parse_order
from ratepay_oms.ratepay import RatepayFacade, RatepaySettings, RatepayValidationError
from ratepay_oms.ratepay.examples import example_basket, example_customer
from ratepay_oms.ratepay.types import BankAccount, PaymentInfo
from ratepay_oms.ratepay.xml import q
from ratepay_oms.sandbox.testing import basket_xml, customer_xml, payment_xml, request_xml

B2B = Path(__file__).parent / "data" / "order-b2b-elv.json"


@pytest.fixture
def b2b() -> dict[str, Any]:
    return json.loads(B2B.read_text(encoding="utf-8"))


def _refused(order: dict[str, Any], field: str) -> str:
    with pytest.raises(OrderInputError) as refused:
        parse_order(order)
    assert str(refused.value).startswith(field), str(refused.value)
    return str(refused.value)


def test_order_ref_longer_than_50_characters_is_refused() -> None:
    assert parse_order(example_order("R" * 50)).order_ref == "R" * 50
    assert "50" in _refused(example_order("R" * 51), "order_ref")


@pytest.mark.parametrize(
    ("iban", "why"),
    [
        ("DE02120300000000202052", "check digits"),
        ("DE0212030000000020205", "22 characters"),
        ("D102120300000000202051", "not an IBAN"),
    ],
)
def test_a_wrong_iban_is_refused_at_intake(b2b, iban, why) -> None:
    b2b["customer"]["bank_account"]["iban"] = iban
    message = _refused(b2b, "customer.bank_account.iban")
    assert why in message and iban not in message  # bank data is not echoed


def test_iban_bic_and_mandate_reference_are_kept_normalised(b2b) -> None:
    b2b["customer"]["bank_account"]["bic"] = "byla dem1 001"
    bank = parse_order(b2b).customer.bank_account
    assert bank is not None
    assert (bank.iban, bank.bic, bank.mandate_reference) == (
        "DE02120300000000202051",
        "BYLADEM1001",
        "RP-100046-01",
    )
    for bic in ("BYLADE", "BYLA1EM1001", "BYLADEM10011"):
        b2b["customer"]["bank_account"]["bic"] = bic
        _refused(copy.deepcopy(b2b), "customer.bank_account.bic")
    b2b["customer"]["bank_account"]["bic"] = "BYLADEM1"
    b2b["customer"]["bank_account"]["mandate_reference"] = "//RP-1"
    _refused(b2b, "customer.bank_account.mandate_reference")


@pytest.mark.parametrize("token", ["abc def", "tok€n", "a" * 256, "x;drop"])
def test_a_device_token_outside_ratepays_alphabet_is_refused(token) -> None:
    order = example_order("D-1") | {"device_token": token}
    _refused(order, "device_token")


def test_a_uuid_and_a_plain_token_are_accepted() -> None:
    for token in ("3f2c9a1e-6b7d-4e8f-9a0b-1c2d3e4f5a6b", "b2f1c6a0d7e9_4d1e"):
        assert parse_order(example_order("D-2") | {"device_token": token}).device_token == token


@pytest.mark.parametrize(
    "field", ["vat_id", "company_id", "registry_location", "company_type", "homepage"]
)
def test_company_details_need_a_company_name(b2b, field) -> None:
    del b2b["customer"]["company_name"]
    for other in ("vat_id", "company_id", "registry_location", "company_type", "homepage"):
        if other != field:
            b2b["customer"].pop(other)
    b2b["customer"]["date_of_birth"] = "1980-01-01"
    _refused(b2b, f"customer.{field}")


def test_delivery_types(b2b) -> None:
    assert parse_order(b2b).customer.delivery_address.delivery_type == "PICK_UP_SHOP"
    b2b["customer"]["delivery_address"]["delivery_type"] = "DRONE"
    _refused(copy.deepcopy(b2b), "customer.delivery_address.delivery_type")
    b2b["customer"]["delivery_address"]["delivery_type"] = "ADDRESS"
    assert parse_order(b2b).customer.delivery_address.delivery_type is None  # the default
    b2b["customer"]["billing_address"]["delivery_type"] = "PICK_UP_BOX"
    assert "pick-up" in _refused(b2b, "customer.billing_address.delivery_type")


# --------------------------------------------------------------------------- over HTTP


def _sent(sandbox, operation: str) -> etree._Element:
    exchange = next(e for e in reversed(sandbox.gateway.received) if e.operation == operation)
    return etree.fromstring(exchange.request_xml)


def test_b2b_order_reaches_ratepay_with_company_details_delivery_type_and_mandate(
    server_db_url, sandbox, b2b
) -> None:
    db_url = server_db_url
    ref = b2b["order_ref"] = f"B-{uuid.uuid4().hex[:8]}"
    engine = demo_engine(db_url, sandbox.settings)
    try:
        engine.place_order(b2b)
        assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    finally:
        engine.close()
    request = _sent(sandbox, "PAYMENT_REQUEST")
    customer = request.find(f"{q('content')}/{q('customer')}")
    tags = [etree.QName(c).localname for c in customer]
    b2b_tags = ["company-name", "vat-id", "company-id", "registry-location", "company-type",
                "homepage"]
    assert tags[-6:] == b2b_tags  # the documented order, after the person's data
    assert customer.findtext(q("registry-location")) == "Amtsgericht Köln"
    delivery = customer.find(f"{q('addresses')}/{q('address')}[@type='DELIVERY']")
    assert delivery.get("delivery-type") == "PICK_UP_SHOP"
    billing = customer.find(f"{q('addresses')}/{q('address')}[@type='BILLING']")
    assert billing.get("delivery-type") is None
    assert customer.findtext(f"{q('bank-account')}/{q('iban')}") == "DE02120300000000202051"
    head = request.find(q("head"))
    device = head.findtext(f"{q('customer-device')}/{q('device-token')}")
    assert device == "3f2c9a1e-6b7d-4e8f-9a0b-1c2d3e4f5a6b"

    _mount()
    env = {"RATEPAY_OMS_DATABASE_URL": db_url, "COLUMNS": "200"}
    env |= {f"RATEPAY_{k}": v for k, v in sandbox.settings.items()}
    shown = CliRunner().invoke(cli, ["order", "show", ref], env=env)
    assert shown.exit_code == 0, shown.output
    assert "mandate_reference RP-100046-01" in shown.output
    as_json = CliRunner().invoke(cli, ["order", "show", ref, "--json"], env=env)
    assert json.loads(as_json.output)["payment"]["mandate_reference"] == "RP-100046-01"


def test_the_facade_refuses_a_bad_iban_before_sending(sandbox) -> None:
    facade = RatepayFacade(RatepaySettings.from_mapping(sandbox.settings))
    tx = facade.init_payment().transaction_id
    customer = example_customer()
    bad = type(customer)(**{**vars(customer),
                            "bank_account": BankAccount("Erika", "DE02120300000000202052")})
    before = len(sandbox.gateway.received)
    with pytest.raises(RatepayValidationError, match="check digits"):
        facade.request_payment(tx, bad, example_basket(), PaymentInfo("ELV"))
    assert len(sandbox.gateway.received) == before  # nothing left
    with pytest.raises(RatepayValidationError, match="order id"):
        facade.request_payment(tx, customer, example_basket(), PaymentInfo("INVOICE"),
                               order_id="R" * 51)


def test_the_sandbox_answers_a_bad_iban_with_2110_like_ratepay(sandbox) -> None:
    import requests

    init = request_xml("PAYMENT_INIT", sandbox.settings)
    answer = requests.post(sandbox.url, data=init, timeout=5).content
    tx = etree.fromstring(answer).findtext(f"{q('head')}/{q('transaction-id')}")
    customer = customer_xml()
    bank = etree.SubElement(customer, q("bank-account"))
    etree.SubElement(bank, q("owner")).text = "Erika"
    etree.SubElement(bank, q("iban")).text = "DE02120300000000202052"
    basket = basket_xml([("SKU-100", 1, "12.50")])
    body = request_xml("PAYMENT_REQUEST", sandbox.settings, transaction_id=tx,
                       content=[customer, basket, payment_xml("12.50", "ELV")])
    root = etree.fromstring(requests.post(sandbox.url, data=body, timeout=5).content)
    processing = root.find(f"{q('head')}/{q('processing')}")
    assert processing.find(q("reason")).get("code") == "2110"
    assert processing.find(q("result")).get("code") == "150"
