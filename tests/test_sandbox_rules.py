"""The sandbox profile's contract and the status/result faults, seen through the facade.

Each test goes over real HTTP to a sandbox on loopback (reference ``ratepay-xml-api.md`` §11
items 4 and 7): a PAYMENT_REQUEST outside the profile's limits (2005/2006), with a deviating
delivery address the profile does not allow (2001) or for a company the profile does not
serve (2002); answers with status FATAL or WARNING and result 405. For each the typed result
must not be a success, must carry the reason (and the customer message where the gateway
sends one), and the gateway must have booked nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal

import pytest

from ratepay_oms.ratepay import (
    Address,
    Basket,
    BasketItem,
    InstallmentDetails,
    MemoryApiLogSink,
    PaymentInfo,
    RatepayFacade,
    RatepayResult,
    RatepaySettings,
)
from ratepay_oms.ratepay.examples import (
    MUG,
    ORDER_ID,
    example_basket,
    example_customer,
    lines,
)
from ratepay_oms.sandbox import Fault, SandboxConfig
from ratepay_oms.sandbox.protocol import DECLINE_MESSAGES
from ratepay_oms.sandbox.testing import RunningSandbox, start_sandbox

TAX = Decimal("19")
COMPANY = "Beispiel Handels GmbH"
OTHER_PLACE = Address(
    street="Hafenstraße",
    street_number="3",
    zip_code="20457",
    city="Hamburg",
    country_code="DE",
    first_name="Erika",
    last_name="Beispiel",
)

# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture
def api_log() -> MemoryApiLogSink:
    return MemoryApiLogSink()


def facade_for(sandbox: RunningSandbox, api_log: MemoryApiLogSink) -> RatepayFacade:
    settings = RatepaySettings.from_mapping({**sandbox.settings, "READ_TIMEOUT": "2"})
    return RatepayFacade(settings, api_log=api_log)


@pytest.fixture
def facade(sandbox: RunningSandbox, api_log: MemoryApiLogSink) -> RatepayFacade:
    return facade_for(sandbox, api_log)


@pytest.fixture
def strict() -> Iterator[RunningSandbox]:
    """A profile without B2B, without deviating delivery addresses, B2B capped at 50.00."""
    running = start_sandbox(
        SandboxConfig(
            seed=1, b2b_methods=(), delivery_address_methods=(), tx_limit_max_b2b=Decimal("50")
        )
    )
    try:
        yield running
    finally:
        running.stop()


def one_item(price: str) -> Basket:
    return Basket(items=(BasketItem("SKU-900", "Single article", 1, Decimal(price), TAX),))


def request(
    facade: RatepayFacade, customer=None, basket: Basket | None = None, payment=None
) -> RatepayResult:
    tx = facade.init_payment().transaction_id
    return facade.request_payment(
        tx,
        customer or example_customer(),
        basket or example_basket(),
        payment or PaymentInfo("INVOICE"),
        order_id=ORDER_ID,
    )


def assert_nothing_booked(sandbox: RunningSandbox, result: RatepayResult, state: str) -> None:
    """The gateway authorised no position and recorded no booking for this transaction."""
    tx = result.transaction_id
    assert tx is not None
    assert sandbox.gateway.ledger(tx) == {}
    assert sandbox.gateway.transactions[tx].state == state
    assert sandbox.gateway.transactions[tx].bookings == []
    if state == "declined":
        status = sandbox.status(tx).json()
        assert status["payment_information"]["payment_status"] == "DECLINED"
        assert status["basket"]["current_items"][0]["shop_items"]["open_items"] == []
    else:  # a 150 leaves no status to look up: start over with a new transaction
        assert sandbox.status(tx).status_code == 404
    assert not sandbox.gateway.received[-1].booked


# --------------------------------------------------------------------------- limits: 2005 / 2006


def test_basket_below_the_minimum_is_refused_with_2005(facade, sandbox, api_log) -> None:
    result = request(facade, basket=one_item("0.99"))
    assert not result.success and result.failed and not result.declined
    assert (result.status_code, result.reason_code, result.result_code) == ("ERROR", 2005, 150)
    assert result.reason_text.startswith("Shopping basket amount too low for current product")
    assert result.response_type == "STATUS_ERROR"
    assert api_log.records[-1].success is False and api_log.records[-1].reason_code == 2005
    assert_nothing_booked(sandbox, result, "failed")


def test_basket_above_the_maximum_is_refused_with_2006(facade, sandbox) -> None:
    result = request(facade, basket=one_item("10000.01"))
    assert not result.success and result.failed
    assert (result.status_code, result.reason_code, result.result_code) == ("ERROR", 2006, 150)
    assert result.reason_text.startswith("Shopping basket amount too high for current product")
    assert_nothing_booked(sandbox, result, "failed")


def test_the_limits_themselves_are_allowed(api_log) -> None:
    running = start_sandbox(SandboxConfig(seed=1, decline_over=Decimal("20000.00")))
    try:
        facade = facade_for(running, api_log)
        assert request(facade, basket=one_item("1.00")).success
        assert request(facade, basket=one_item("10000.00")).success
    finally:
        running.stop()


def test_installment_is_bounded_by_the_installment_limits(facade, sandbox) -> None:
    plan = InstallmentDetails(Decimal("150.00"), 3, Decimal("50.00"), Decimal("50.00"), TAX, 28)
    result = request(
        facade,
        example_customer(with_bank_account=True),
        one_item("150.00"),
        PaymentInfo("INSTALLMENT", plan, "DIRECT-DEBIT"),
    )
    assert (result.success, result.reason_code, result.result_code) == (False, 2005, 150)
    assert_nothing_booked(sandbox, result, "failed")


def test_a_company_has_its_own_maximum(strict, api_log) -> None:
    facade = facade_for(strict, api_log)
    b2c = request(facade)  # 82.45: within the B2C limit
    assert b2c.success
    result = request(facade, replace(example_customer(), company_name=COMPANY))
    assert (result.status_code, result.reason_code, result.result_code) == ("ERROR", 2006, 150)
    assert_nothing_booked(strict, result, "failed")


def test_a_refused_request_accepts_no_follow_up(facade, sandbox) -> None:
    result = request(facade, basket=one_item("0.99"))
    follow_up = facade.confirm_delivery(result.transaction_id, one_item("0.99"))
    assert follow_up.failed and follow_up.reason_code == 2300
    assert sandbox.gateway.ledger(result.transaction_id) == {}


# --------------------------------------------------------------------------- B2B: 2002


def test_company_is_declined_with_2002_when_the_profile_has_no_b2b(strict, api_log) -> None:
    facade = facade_for(strict, api_log)
    customer = replace(example_customer(), company_name=COMPANY, language="en")
    result = request(facade, customer, basket=one_item("20.00"))
    assert not result.success and result.declined and not result.failed
    assert (result.status_code, result.reason_code, result.result_code) == ("OK", 2002, 401)
    assert result.reason_text == "B2B not allowed for current product"
    assert result.customer_message == DECLINE_MESSAGES["en"]
    assert api_log.records[-1].success is False and api_log.records[-1].result_code == 401
    assert_nothing_booked(strict, result, "declined")


def test_company_is_accepted_by_the_default_profile(facade) -> None:
    result = request(facade, replace(example_customer(), company_name=COMPANY))
    assert result.success and result.result_code == 402


# --------------------------------------------------------------------------- delivery: 2001


def test_deviating_delivery_address_is_refused_with_2001(strict, api_log) -> None:
    facade = facade_for(strict, api_log)
    result = request(facade, replace(example_customer(), delivery_address=OTHER_PLACE))
    assert not result.success and result.failed and not result.declined
    assert (result.status_code, result.reason_code, result.result_code) == ("ERROR", 2001, 150)
    assert result.reason_text == "Different delivery address for current product not allowed"
    assert_nothing_booked(strict, result, "failed")


def test_delivery_to_the_billing_address_is_not_deviating(strict, api_log) -> None:
    facade = facade_for(strict, api_log)
    customer = example_customer()
    same_place = replace(
        customer.billing_address, street="MUSTERWEG ", first_name="Max", last_name="Beispiel"
    )
    assert request(facade, replace(customer, delivery_address=same_place)).success


def test_deviating_delivery_address_is_accepted_by_the_default_profile(facade) -> None:
    assert request(facade, replace(example_customer(), delivery_address=OTHER_PLACE)).success


# --------------------------------------------------------------------------- profile and query


def test_profile_request_reports_the_contract_the_gateway_enforces(strict, api_log) -> None:
    data = facade_for(strict, api_log).request_profile().master_data
    assert (data["tx-limit-invoice-min"], data["tx-limit-invoice-max"]) == ("1.00", "10000.00")
    assert data["tx-limit-invoice-max-b2b"] == "50.00"
    assert (data["tx-limit-installment-min"], data["tx-limit-installment-max"]) == (
        "200.00",
        "3500.00",
    )
    for method in ("invoice", "installment", "elv", "prepayment"):
        assert data[f"b2b-{method}"] == "no"
        assert data[f"delivery-address-{method}"] == "no"


def test_default_profile_allows_b2b_except_installment_and_any_delivery(facade) -> None:
    data = facade.request_profile().master_data
    assert [data[f"b2b-{m}"] for m in ("invoice", "installment", "elv", "prepayment")] == [
        "yes",
        "no",
        "yes",
        "yes",
    ]
    assert {data[f"delivery-address-{m}"] for m in ("invoice", "elv", "prepayment")} == {"yes"}


def test_payment_query_offers_only_what_the_contract_allows(strict, api_log) -> None:
    facade = facade_for(strict, api_log)
    tx = facade.init_payment().transaction_id
    b2c = facade.query_payment(tx, example_customer(), example_basket())
    assert set(b2c.products) == {"INVOICE", "ELV", "PREPAYMENT"}  # 82.45 < 200 instalment
    tx = facade.init_payment().transaction_id
    moved = facade.query_payment(
        tx, replace(example_customer(), delivery_address=OTHER_PLACE), example_basket()
    )
    assert moved.success and moved.products == ()


def test_config_refuses_installment_for_b2b() -> None:
    with pytest.raises(ValueError, match="INSTALLMENT"):
        SandboxConfig(b2b_methods=("INVOICE", "INSTALLMENT"))
    with pytest.raises(ValueError, match="unknown method"):
        SandboxConfig(delivery_address_methods=("PAYPAL",))


# --------------------------------------------------------------------------- status / result faults


def authorised(facade: RatepayFacade) -> str:
    result = request(facade)
    assert result.success
    return result.transaction_id


def test_status_fatal_without_a_result_is_a_failure(facade, sandbox, api_log) -> None:
    tx = authorised(facade)
    sandbox.gateway.faults.add(Fault("status_fatal", operation="CONFIRMATION_DELIVER", times=1))
    result = facade.confirm_delivery(tx, Basket(items=lines((MUG, 1))))
    assert not result.success and result.failed
    assert (result.status_code, result.reason_code, result.result_code) == ("FATAL", 1000, None)
    assert result.response_type == "STATUS_ERROR"
    assert api_log.records[-1].success is False
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 0
    assert not sandbox.gateway.received[-1].booked
    # times=1: sent again, it books once
    assert facade.confirm_delivery(tx, Basket(items=lines((MUG, 1)))).success
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 1


def test_status_warning_with_the_success_result_is_a_failure(facade, sandbox, api_log) -> None:
    tx = authorised(facade)
    sandbox.gateway.faults.add(Fault("status_warning", operation="CONFIRMATION_DELIVER"))
    result = facade.confirm_delivery(tx, Basket(items=lines((MUG, 1))))
    assert (result.status_code, result.reason_code, result.result_code) == ("WARNING", 303, 404)
    assert not result.success and result.failed
    assert api_log.records[-1].success is False
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 0


def test_status_warning_on_the_payment_request_authorises_nothing(facade, sandbox) -> None:
    sandbox.gateway.faults.add(Fault("status_warning", operation="PAYMENT_REQUEST"))
    result = request(facade)
    assert (result.status_code, result.result_code) == ("WARNING", 402)
    assert not result.success and result.descriptor is None
    assert_nothing_booked(sandbox, result, "initialized")


def test_result_405_warning_is_not_a_success(facade, sandbox, api_log) -> None:
    tx = authorised(facade)
    sandbox.gateway.faults.add(
        Fault("result_warning", operation="PAYMENT_CHANGE", subtype="cancellation")
    )
    result = facade.cancel(tx, Basket(items=lines((MUG, 1))))
    assert (result.status_code, result.result_code) == ("OK", 405)
    assert not result.success and not result.declined
    assert api_log.records[-1].success is False and api_log.records[-1].result_code == 405
    assert sandbox.gateway.ledger(tx)["SKU-100"].cancelled == 0


def test_result_code_405_fault_answers_error_and_is_not_a_success(facade, sandbox) -> None:
    tx = authorised(facade)
    sandbox.gateway.faults.add(Fault("result_code", operation="PAYMENT_CHANGE", result_code=405))
    result = facade.cancel(tx, Basket(items=lines((MUG, 1))))
    assert (result.status_code, result.reason_code, result.result_code) == ("ERROR", 1000, 405)
    assert not result.success and result.failed
    assert sandbox.gateway.ledger(tx)["SKU-100"].cancelled == 0
