"""The sandbox gateway over real HTTP: each operation, each refusal, the status lookup."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
import requests
from lxml import etree

from ratepay_oms.ratepay.xml import RATEPAY_NS, parse_xml
from ratepay_oms.sandbox.testing import (
    RunningSandbox,
    basket_xml,
    customer_xml,
    payment_xml,
    request_xml,
)

NS = {"r": RATEPAY_NS}
ORDER = [("SKU-100", 3, "12.50"), ("SKU-200", 1, "49.90", "-4.90")]


def post(sandbox: RunningSandbox, body: bytes) -> etree._Element:
    response = requests.post(
        sandbox.url, data=body, headers={"Content-Type": "text/xml; charset=UTF-8"}, timeout=5
    )
    assert response.status_code == 200
    return parse_xml(response.content)


def outcome(root: etree._Element) -> tuple[str, int, int]:
    p = root.find("r:head/r:processing", NS)
    return (
        p.find("r:status", NS).get("code"),
        int(p.find("r:reason", NS).get("code")),
        int(p.find("r:result", NS).get("code")),
    )


def text(root: etree._Element, path: str) -> str:
    return root.findtext(path, namespaces=NS)


def init(sandbox: RunningSandbox) -> str:
    root = post(sandbox, request_xml("PAYMENT_INIT", sandbox.settings))
    assert outcome(root) == ("OK", 300, 350)
    return text(root, "r:head/r:transaction-id")


def authorised(sandbox: RunningSandbox, last_name: str = "Beispiel") -> tuple[str, etree._Element]:
    tx = init(sandbox)
    basket = basket_xml(ORDER, shipping="4.95", discount="-5.00")
    root = post(
        sandbox,
        request_xml(
            "PAYMENT_REQUEST",
            sandbox.settings,
            transaction_id=tx,
            order_id="100045",
            content=[customer_xml(last_name), basket, payment_xml(basket.get("amount"))],
        ),
    )
    return tx, root


def follow_up(sandbox, tx, op, basket, subtype=None) -> etree._Element:
    return post(
        sandbox,
        request_xml(op, sandbox.settings, transaction_id=tx, subtype=subtype, content=[basket]),
    )


def test_payment_init_issues_ids_in_ratepay_formats(sandbox: RunningSandbox) -> None:
    root = post(sandbox, request_xml("PAYMENT_INIT", sandbox.settings))
    assert re.fullmatch(r"\d{2}-\d{8}\d{7}", text(root, "r:head/r:transaction-id"))
    assert re.fullmatch(
        r"([0-9A-Z]{4}\.){3}[0-9A-Z]{4}", text(root, "r:head/r:transaction-short-id")
    )
    assert text(root, "r:head/r:response-type") == "STATUS_RESPONSE"
    assert text(root, "r:head/r:system-id") == sandbox.settings["SYSTEM_ID"]
    assert root.find("r:head/r:processing/r:timestamp", NS).text.endswith(".000")


def test_payment_request_approves_with_descriptor_and_echoes_external(sandbox) -> None:
    tx, root = authorised(sandbox)
    assert outcome(root) == ("OK", 700, 402)
    assert text(root, "r:head/r:response-type") == "PAYMENT_PERMISSION"
    assert re.fullmatch(r"[A-Z]{2}\d{7}[A-Z]\d", text(root, "r:content/r:payment/r:descriptor"))
    assert text(root, "r:head/r:external/r:order-id") == "100045"
    assert text(root, "r:content/r:customer/r:addresses/r:address/r:city") == "Berlin"
    assert sandbox.gateway.transactions[tx].state == "requested"
    assert sandbox.gateway.ledger(tx)["SKU-100"].ordered == 3


def test_payment_request_declines_ablehnung_and_refuses_follow_ups(sandbox) -> None:
    tx, root = authorised(sandbox, last_name="Ablehnung")
    assert outcome(root) == ("OK", 703, 401)
    assert text(root, "r:head/r:response-type") == "STATUS_ERROR"
    assert text(root, "r:head/r:processing/r:customer-message")
    root = follow_up(sandbox, tx, "CONFIRMATION_DELIVER", basket_xml([ORDER[0]]))
    assert outcome(root) == ("ERROR", 2300, 150)
    assert sandbox.gateway.transactions[tx].state == "declined"


def test_payment_request_declines_a_basket_over_the_risk_threshold(sandbox) -> None:
    """``decline_over`` (5000.00) is a risk rule within the profile's limit (10000.00)."""
    tx = init(sandbox)
    basket = basket_xml([("TV", 1, "5000.01")])
    root = post(
        sandbox,
        request_xml(
            "PAYMENT_REQUEST",
            sandbox.settings,
            transaction_id=tx,
            content=[customer_xml(), basket, payment_xml("5000.01")],
        ),
    )
    assert outcome(root) == ("OK", 703, 401)


def test_unknown_transaction_is_refused_with_reason_100(sandbox) -> None:
    root = follow_up(sandbox, "31-202401010000001", "CONFIRMATION_DELIVER", basket_xml([ORDER[0]]))
    assert outcome(root) == ("ERROR", 100, 150)
    assert "no regular TransactionId" in text(root, "r:head/r:processing/r:reason")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: {**s, "SECURITY_CODE": "0" * 32}, 120),
        (lambda s: {**s, "PROFILE_ID": "SOMEONE_ELSE"}, 120),
    ],
    ids=["wrong-security-code", "wrong-profile"],
)
def test_wrong_credentials_are_refused(sandbox, mutate, expected) -> None:
    root = post(sandbox, request_xml("PAYMENT_INIT", mutate(sandbox.settings)))
    assert outcome(root) == ("ERROR", expected, 150)
    assert "0" * 32 not in etree.tostring(root).decode()


def test_head_rules(sandbox) -> None:
    s = sandbox.settings
    assert outcome(post(sandbox, request_xml("PAYMENT_INIT", s, credential=False))) == (
        "ERROR",
        121,
        150,
    )
    assert outcome(post(sandbox, request_xml("PAYMENT_RUN", s)))[1] == 202
    assert outcome(post(sandbox, request_xml("", s)))[1] == 201
    assert outcome(post(sandbox, request_xml("PAYMENT_INIT", s, transaction_id="31-x")))[1] == 206
    assert outcome(post(sandbox, request_xml("PAYMENT_INIT", s, content=[])))[1] == 208
    assert outcome(post(sandbox, request_xml("PROFILE_REQUEST", s, transaction_id="1")))[1] == 206
    tx = init(sandbox)
    assert (
        outcome(
            post(
                sandbox, request_xml("PAYMENT_CHANGE", s, transaction_id=tx, content=[basket_xml()])
            )
        )[1]
        == 214
    )
    assert (
        outcome(post(sandbox, request_xml("CONFIRMATION_DELIVER", s, transaction_id=tx)))[1] == 209
    )
    assert (
        outcome(post(sandbox, request_xml("CONFIRMATION_DELIVER", s, content=[basket_xml()])))[1]
        == 200
    )  # transaction-id mandatory
    assert outcome(post(sandbox, request_xml("CALCULATION_REQUEST", s)))[1] == 234


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (lambda b: [b, payment_xml("82.45")], 216),
        (lambda b: [customer_xml(drop=("last-name",)), b, payment_xml("82.45")], 223),
        (lambda b: [customer_xml(drop=("contacts",)), b, payment_xml("82.45")], 220),
        (lambda b: [customer_xml(drop=("addresses",)), b, payment_xml("82.45")], 224),
        (lambda b: [customer_xml(drop=("date-of-birth",)), b, payment_xml("82.45")], 227),
        (lambda b: [customer_xml(), payment_xml("82.45")], 210),
        (lambda b: [customer_xml(), b], 212),
        (lambda b: [customer_xml(), b, payment_xml("82.45", method="ELV")], 230),
        (lambda b: [customer_xml(), b, payment_xml("82.40")], 200),
    ],
    ids=[
        "no-customer",
        "no-last-name",
        "no-contacts",
        "no-addresses",
        "no-birth-date",
        "no-basket",
        "no-payment",
        "elv-without-bank",
        "payment-amount-mismatch",
    ],
)
def test_payment_request_mandatory_content(sandbox, content, reason) -> None:
    tx = init(sandbox)
    basket = basket_xml(ORDER, shipping="4.95", discount="-5.00")
    root = post(
        sandbox,
        request_xml(
            "PAYMENT_REQUEST", sandbox.settings, transaction_id=tx, content=content(basket)
        ),
    )
    assert outcome(root) == ("ERROR", reason, 150)
    # a failed PAYMENT_REQUEST burns the transaction: RatePAY wants a new one
    assert sandbox.gateway.transactions[tx].state == "failed"


def test_basket_sum_mismatch_is_validation_error_200(sandbox) -> None:
    tx, _ = authorised(sandbox)
    root = follow_up(sandbox, tx, "CONFIRMATION_DELIVER", basket_xml([ORDER[0]], amount="37.49"))
    assert outcome(root) == ("ERROR", 200, 150)
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 0


def test_worked_example_over_http_and_status_lookup(sandbox) -> None:
    tx, _ = authorised(sandbox)
    confirm = post(
        sandbox,
        request_xml("PAYMENT_CONFIRM", sandbox.settings, transaction_id=tx, order_id="100045"),
    )
    assert outcome(confirm) == ("OK", 303, 400)
    steps = [
        (
            "CONFIRMATION_DELIVER",
            None,
            basket_xml([("SKU-100", 2, "12.50")], shipping="4.95"),
            ("OK", 303, 404),
        ),
        ("PAYMENT_CHANGE", "cancellation", basket_xml([("SKU-100", 1, "12.50")]), ("OK", 700, 403)),
        ("CONFIRMATION_DELIVER", None, basket_xml([ORDER[1]], discount="-5.00"), ("OK", 303, 404)),
        ("PAYMENT_CHANGE", "return", basket_xml([("SKU-100", 1, "12.50")]), ("OK", 700, 403)),
        ("PAYMENT_CHANGE", "credit", basket_xml(discount="-7.50"), ("OK", 700, 403)),
    ]
    for op, subtype, basket, expected in steps:
        assert outcome(follow_up(sandbox, tx, op, basket, subtype)) == expected, (op, subtype)
    refused = [
        ("PAYMENT_CHANGE", "cancellation", basket_xml([("SKU-100", 1, "12.50")])),
        ("PAYMENT_CHANGE", "return", basket_xml([("SKU-100", 2, "12.50")])),
        ("CONFIRMATION_DELIVER", None, basket_xml([ORDER[1]])),
        ("CONFIRMATION_DELIVER", None, basket_xml([("SKU-100", 1, "12.00")])),
    ]
    for op, subtype, basket in refused:
        assert outcome(follow_up(sandbox, tx, op, basket, subtype)) == ("ERROR", 2300, 150)
    led = sandbox.gateway.ledger(tx)
    assert (
        led["SKU-100"].open,
        led["SKU-100"].delivered,
        led["SKU-100"].cancelled,
        led["SKU-100"].returned,
    ) == (0, 2, 1, 1)
    assert (led["SKU-200"].open, led["SKU-200"].delivered) == (0, 1)
    assert led["shipping"].delivered == Decimal("4.95")
    assert led["discount"].delivered == Decimal("-5.00")

    status = sandbox.status(tx)
    assert status.status_code == 200
    data = status.json()
    assert data["general_order_information"]["shop_order_id"] == "100045"
    basket = data["basket"]
    assert (basket["initial_order_amount_gross"], basket["current_order_amount_gross"]) == (
        82.45,
        49.95,
    )
    lists = basket["current_items"][0]["shop_items"]
    listed = {
        name: {(i["identification_number"], i["quantity"]) for i in lists[name]}
        for name in ("open_items", "shipped_items", "returned_items")
    }
    # SKU-100: 3 ordered, 2 delivered, 1 cancelled (in no list), 1 of the 2 returned
    assert listed == {
        "open_items": set(),
        "shipped_items": {("SKU-100", 1), ("SKU-200", 1)},
        "returned_items": {("SKU-100", 1)},
    }
    assert data["payment_information"]["payment_status"] == "DELIVERED"
    assert sandbox.status("nope").status_code == 404


def test_full_cancellation_with_empty_basket(sandbox) -> None:
    tx, _ = authorised(sandbox)
    root = follow_up(sandbox, tx, "PAYMENT_CHANGE", basket_xml(), "cancellation")
    assert outcome(root) == ("OK", 700, 403)
    assert sandbox.gateway.transactions[tx].state == "cancelled"
    assert sandbox.gateway.ledger(tx)["SKU-100"].cancelled == 3
    root = follow_up(sandbox, tx, "CONFIRMATION_DELIVER", basket_xml([("SKU-100", 1, "12.50")]))
    assert outcome(root) == ("ERROR", 2300, 150)


def test_change_order(sandbox) -> None:
    tx, _ = authorised(sandbox)
    basket = basket_xml(
        [("SKU-100", 3, "12.50"), ("SKU-210", 1, "30.00")], shipping="4.95", discount="-5.00"
    )
    assert basket.get("amount") == "67.45"
    root = follow_up(sandbox, tx, "PAYMENT_CHANGE", basket, "change-order")
    assert outcome(root) == ("OK", 700, 403)
    assert sandbox.gateway.ledger(tx)["SKU-200"].open == 0
    assert sandbox.gateway.transactions[tx].amount == Decimal("67.45")


def test_payment_query_lists_products(sandbox) -> None:
    tx = init(sandbox)
    root = post(
        sandbox,
        request_xml(
            "PAYMENT_QUERY",
            sandbox.settings,
            transaction_id=tx,
            subtype="full",
            content=[customer_xml(), basket_xml(ORDER)],
        ),
    )
    assert outcome(root) == ("OK", 700, 402)
    assert text(root, "r:head/r:response-type") == "PAYMENT_PRODUCTS"
    methods = [p.get("method") for p in root.iterfind("r:content/r:products/r:product", NS)]
    assert "INVOICE" in methods and "INSTALLMENT" not in methods  # 82.45 is below 200.00


def test_profile_and_configuration_requests(sandbox) -> None:
    root = post(sandbox, request_xml("PROFILE_REQUEST", sandbox.settings))
    assert outcome(root) == ("OK", 306, 500)
    assert text(root, "r:head/r:response-type") == "PROFILE_SETTINGS"
    assert text(root, "r:content/r:master-data/r:profile-id") == sandbox.settings["PROFILE_ID"]
    assert text(root, "r:content/r:master-data/r:tx-limit-invoice-min") == "1.00"
    assert text(root, "r:content/r:master-data/r:tx-limit-invoice-max") == "10000.00"
    assert root.find("r:head/r:transaction-id", NS) is None
    root = post(sandbox, request_xml("CONFIGURATION_REQUEST", sandbox.settings))
    assert outcome(root) == ("OK", 306, 500)
    assert text(root, "r:content/r:installment-configuration-result/r:month-allowed")


def calc(sandbox, subtype: str, amount: str, tag: str, value: str) -> etree._Element:
    c = etree.Element(f"{{{RATEPAY_NS}}}installment-calculation")
    etree.SubElement(c, f"{{{RATEPAY_NS}}}amount").text = amount
    wrapper = etree.SubElement(c, f"{{{RATEPAY_NS}}}calculation-{tag}")
    etree.SubElement(
        wrapper, f"{{{RATEPAY_NS}}}{'month' if tag == 'time' else 'rate'}"
    ).text = value
    return post(
        sandbox, request_xml("CALCULATION_REQUEST", sandbox.settings, subtype=subtype, content=[c])
    )


def plan(root: etree._Element) -> dict[str, str]:
    result = root.find("r:content/r:installment-calculation-result", NS)
    return {etree.QName(el).localname: el.text for el in result}


def test_calculation_by_time_computes_a_consistent_plan(sandbox) -> None:
    root = calc(sandbox, "calculation-by-time", "230.00", "time", "12")
    assert outcome(root) == ("OK", 603, 502)
    p = plan(root)
    total, rate, last = Decimal(p["total-amount"]), Decimal(p["rate"]), Decimal(p["last-rate"])
    assert p["number-of-rates"] == "12"
    assert rate * 11 + last == total
    assert total == Decimal("230.00") + Decimal(p["interest-amount"]) + Decimal(p["service-charge"])
    assert Decimal("0") < rate - last < Decimal("0.12")
    assert p["interest-amount"] == "17.42" and p["monthly-debit-interest"] == "1.14"
    assert Decimal(p["annual-percentage-rate"]) > Decimal(p["interest-rate"])


def test_calculation_by_rate_picks_the_runtime(sandbox) -> None:
    root = calc(sandbox, "calculation-by-rate", "600.00", "rate", "60.00")
    assert outcome(root)[2] == 502
    p = plan(root)
    assert Decimal(p["rate"]) <= Decimal("60.00")
    assert p["number-of-rates"] == "12"
    assert outcome(calc(sandbox, "calculation-by-time", "50.00", "time", "6")) == ("OK", 650, 503)


def test_body_over_the_cap_gets_413(sandbox) -> None:
    body = b"<x>" + b"a" * (sandbox.gateway.config.max_body_bytes + 1) + b"</x>"
    try:
        response = requests.post(sandbox.url, data=body, timeout=5)
    except requests.ConnectionError:  # the server may close before the client finished writing
        pytest.skip("connection closed before the 413 could be read")
    assert response.status_code == 413
    assert sandbox.gateway.received == []


def test_security_code_is_not_kept_in_the_exchange_record(sandbox) -> None:
    init(sandbox)
    exchange = sandbox.gateway.received[0]
    assert sandbox.settings["SECURITY_CODE"].encode() not in exchange.request_xml
    assert b"********" in exchange.request_xml
    assert exchange.operation == "PAYMENT_INIT" and exchange.http_status == 200
