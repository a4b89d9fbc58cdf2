"""Several profiles on one sandbox, each with its own credential and contract, and a
PROFILE_REQUEST answer that carries exactly the contract the PAYMENT_REQUEST enforces
(countries, currencies, activation status, limits) — over real HTTP through the facade."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal

import pytest

from ratepay_oms.ratepay import (
    Address,
    Basket,
    BasketItem,
    MemoryApiLogSink,
    PaymentInfo,
    RatepayFacade,
    RatepaySettings,
)
from ratepay_oms.ratepay.examples import ORDER_ID, example_customer
from ratepay_oms.ratepay.profiles import PHASED_OUT, ProfileData
from ratepay_oms.sandbox import SandboxConfig
from ratepay_oms.sandbox.testing import RunningSandbox, start_sandbox

CH_SECRET = "c0ffee00c0ffee00c0ffee00c0ffee00"
CH = SandboxConfig(
    profile_id="SHOP_CH",
    security_code=CH_SECRET,
    billing_countries=("CH",),
    delivery_countries=("CH", "LI"),
    currencies=("CHF",),
    methods=("INVOICE", "PREPAYMENT"),
    phased_out_methods=("PREPAYMENT",),
    tx_limit_max=Decimal("3000.00"),
)


@pytest.fixture
def two_profiles() -> Iterator[RunningSandbox]:
    running = start_sandbox(SandboxConfig(seed=1, billing_countries=("DE", "AT"), profiles=(CH,)))
    try:
        yield running
    finally:
        running.stop()


def facade(sandbox: RunningSandbox, **override: str) -> RatepayFacade:
    settings = RatepaySettings.from_mapping({**sandbox.settings, **override})
    return RatepayFacade(settings, api_log=MemoryApiLogSink())


def ch_facade(sandbox: RunningSandbox) -> RatepayFacade:
    return facade(sandbox, PROFILE_ID="SHOP_CH", SECURITY_CODE=CH_SECRET)


def swiss_customer():
    customer = example_customer()
    return replace(
        customer,
        billing_address=Address(
            street="Bahnhofstrasse", street_number="1", zip_code="8001", city="Zürich",
            country_code="CH",
        ),
    )


def basket(currency: str, price: str = "100.00") -> Basket:
    return Basket(
        items=(BasketItem("SKU-1", "Article", 1, Decimal(price), Decimal("7.7")),),
        currency=currency,
    )


def pay(f: RatepayFacade, customer, b: Basket, method: str = "INVOICE"):
    tx = f.init_payment().transaction_id
    return f.request_payment(tx, customer, b, PaymentInfo(method), order_id=ORDER_ID)


def test_each_profile_answers_with_its_own_contract(two_profiles) -> None:
    de = ProfileData.from_master_data(facade(two_profiles).request_profile().master_data)
    ch = ProfileData.from_master_data(ch_facade(two_profiles).request_profile().master_data)
    assert (de.profile_id, de.billing_countries, de.currencies) == (
        "INTEGRATION_TE_DACH", ("DE", "AT"), ("EUR", "CHF"),
    )
    assert (ch.profile_id, ch.billing_countries, ch.delivery_countries, ch.currencies) == (
        "SHOP_CH", ("CH",), ("CH", "LI"), ("CHF",),
    )
    assert ch.methods["INVOICE"].accepts_new_orders
    assert ch.methods["INVOICE"].tx_limit_max == Decimal("3000.00")
    assert ch.methods["PREPAYMENT"].activation_status == PHASED_OUT
    assert not ch.methods["PREPAYMENT"].accepts_new_orders
    assert not ch.methods["ELV"].eligible


def test_a_profile_accepts_its_own_country_and_currency(two_profiles) -> None:
    result = pay(ch_facade(two_profiles), swiss_customer(), basket("CHF"))
    assert result.success, result.reason_text


def test_the_credential_of_one_profile_does_not_open_the_other(two_profiles) -> None:
    result = facade(two_profiles, PROFILE_ID="SHOP_CH").init_payment()  # DE secret, CH id
    assert (result.reason_code, result.result_code) == (120, 150)


def test_a_transaction_of_one_profile_is_unknown_to_the_other(two_profiles) -> None:
    result = pay(ch_facade(two_profiles), swiss_customer(), basket("CHF"))
    other = facade(two_profiles).confirm_payment(result.transaction_id, ORDER_ID)
    assert (other.reason_code, other.result_code) == (100, 150)


@pytest.mark.parametrize(
    ("customer_country", "currency", "method", "price", "reason"),
    [
        ("DE", "CHF", "INVOICE", "100.00", 2100),  # billing country not served
        ("CH", "EUR", "INVOICE", "100.00", 200),  # currency not served
        ("CH", "CHF", "PREPAYMENT", "100.00", 120),  # phased out: no new orders
        ("CH", "CHF", "ELV", "100.00", 120),  # not active at all
        ("CH", "CHF", "INVOICE", "3000.01", 2006),  # this profile's own maximum
    ],
)
def test_the_contract_reported_is_the_contract_enforced(
    two_profiles, customer_country, currency, method, price, reason
) -> None:
    customer = swiss_customer() if customer_country == "CH" else example_customer()
    if method == "ELV":
        customer = replace(customer, bank_account=example_customer(with_bank_account=True)
                           .bank_account)
    result = pay(ch_facade(two_profiles), customer, basket(currency, price), method)
    assert not result.success
    assert (result.status_code, result.reason_code, result.result_code) == ("ERROR", reason, 150)
    assert two_profiles.gateway.ledger(result.transaction_id) == {}


def test_a_delivery_country_outside_the_profile_is_refused_with_2101(two_profiles) -> None:
    customer = replace(
        swiss_customer(),
        delivery_address=Address(
            street="Städtle", street_number="1", zip_code="9490", city="Vaduz",
            country_code="AT", first_name="Erika", last_name="Beispiel",
        ),
    )
    result = pay(ch_facade(two_profiles), customer, basket("CHF"))
    assert (result.reason_code, result.result_code) == (2101, 150)


def test_no_profile_secret_reaches_the_gateways_record(two_profiles) -> None:
    pay(ch_facade(two_profiles), swiss_customer(), basket("CHF"))
    for exchange in two_profiles.gateway.received:
        assert CH_SECRET.encode() not in exchange.request_xml
        assert two_profiles.settings["SECURITY_CODE"].encode() not in exchange.request_xml
