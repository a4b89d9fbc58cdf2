"""The facade over real HTTP against the sandbox gateway: every operation, refusals, faults.

No mocks: each test talks to a sandbox on a loopback port (fixture ``sandbox``) and checks both
the typed result and what the gateway booked (its ledger).
"""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest

from ratepay_oms.ratepay import (
    Basket,
    BasketItem,
    InstallmentDetails,
    Invoicing,
    MemoryApiLogSink,
    PaymentInfo,
    PositionFigures,
    RatepayFacade,
    RatepaySettings,
    RatepayTransportError,
    RatepayValidationError,
    StatusLookupUnavailable,
    Tracking,
)
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
from ratepay_oms.sandbox import Fault

TAX = Decimal("19")


@pytest.fixture
def api_log() -> MemoryApiLogSink:
    return MemoryApiLogSink()


@pytest.fixture
def facade(sandbox, api_log: MemoryApiLogSink) -> RatepayFacade:
    settings = RatepaySettings.from_mapping(
        {**sandbox.settings, "READ_TIMEOUT": "2"}
    )
    return RatepayFacade(settings, api_log=api_log)


def authorised(facade: RatepayFacade, basket: Basket | None = None, **payment) -> str:
    """INIT + accepted INVOICE request for the worked example; returns the transaction id."""
    init = facade.init_payment()
    assert init.success, init
    result = facade.request_payment(
        init.transaction_id,
        example_customer(**payment.pop("customer", {})),
        basket or example_basket(),
        payment.pop("payment", PaymentInfo("INVOICE")),
        order_id=ORDER_ID,
        device_token="5f1c0d3a9b7e4c21a8d6e0f4b2c9a713",
    )
    assert result.success, (result.result_code, result.reason_code, result.reason_text)
    return init.transaction_id


# --- every operation's success -----------------------------------------------------------


def test_payment_init_opens_a_transaction(facade: RatepayFacade, sandbox) -> None:
    result = facade.init_payment()
    assert result.success and result.result_code == 350 and result.reason_code == 300
    assert result.transaction_id in sandbox.gateway.transactions
    assert result.transaction_short_id and len(result.transaction_short_id) == 19


def test_payment_query_lists_the_permitted_methods(facade: RatepayFacade) -> None:
    tx = facade.init_payment().transaction_id
    result = facade.query_payment(tx, example_customer(), example_basket())
    assert result.success and result.result_code == 402
    assert result.subtype == "full"
    assert "INVOICE" in result.products


def test_invoice_payment_request_is_accepted_with_a_descriptor(facade, sandbox) -> None:
    tx = facade.init_payment().transaction_id
    result = facade.request_payment(
        tx, example_customer(), example_basket(), PaymentInfo("INVOICE"), order_id=ORDER_ID
    )
    assert result.success and result.result_code == 402 and not result.declined
    assert result.descriptor
    assert result.payment_amount == Decimal("82.45")
    assert sandbox.gateway.transactions[tx].order_id == ORDER_ID


@pytest.mark.parametrize("method", ["ELV", "PREPAYMENT"])
def test_elv_and_prepayment_requests_are_accepted(facade, method: str) -> None:
    tx = facade.init_payment().transaction_id
    result = facade.request_payment(
        tx,
        example_customer(with_bank_account=method == "ELV"),
        example_basket(),
        PaymentInfo(method),
    )
    assert result.success, (result.reason_code, result.reason_text)
    assert result.payment_method == method


def test_installment_configuration_calculation_and_request(facade: RatepayFacade) -> None:
    config = facade.installment_configuration()
    assert config.success and config.result_code == 500
    assert config.installment_configuration.get("month-allowed")
    by_time = facade.installment_calculation(Decimal("230.00"), months=12)
    assert (
        by_time.success and by_time.result_code == 502 and by_time.subtype == "calculation-by-time"
    )
    plan = by_time.installment_plan
    assert plan is not None and plan.number_of_rates == 12 and plan.amount == Decimal("230.00")
    by_rate = facade.installment_calculation(Decimal("230.00"), rate=Decimal("25.00"))
    assert by_rate.success and by_rate.subtype == "calculation-by-rate"
    assert by_rate.installment_plan is not None

    basket = Basket(items=(BasketItem("SKU-300", "Kettle", 1, Decimal("230.00"), TAX),))
    tx = facade.init_payment().transaction_id
    result = facade.request_payment(
        tx,
        example_customer(with_bank_account=True),
        basket,
        PaymentInfo("INSTALLMENT", InstallmentDetails.from_plan(plan), "DIRECT-DEBIT"),
    )
    assert result.success, (result.reason_code, result.reason_text)
    assert result.payment_amount == plan.total_amount


def test_profile_request_returns_master_data(facade: RatepayFacade, sandbox) -> None:
    result = facade.request_profile()
    assert result.success and result.result_code == 500
    assert result.master_data.get("profile-id") == sandbox.settings["PROFILE_ID"]


def test_confirm_payment(facade: RatepayFacade) -> None:
    tx = authorised(facade)
    result = facade.confirm_payment(tx, ORDER_ID)
    assert result.success and result.result_code == 400


def test_the_worked_example_life_cycle_books_the_reference_ledger(facade, sandbox) -> None:
    """Order 100045 (§8): partial delivery, cancellation, rest delivery, return, credit."""
    tx = authorised(facade)
    steps = [
        facade.confirm_delivery(
            tx,
            Basket(items=lines((MUG, 2)), shipping=SHIPPING),
            order_id=ORDER_ID,
            invoicing=Invoicing("INV-2024-000311"),
            tracking=[Tracking("DHL", "00340434161094021234")],
        ),
        facade.cancel(tx, Basket(items=lines((MUG, 1))), order_id=ORDER_ID),
        facade.confirm_delivery(tx, Basket(items=lines((TEA_POT, 1)), discount=VOUCHER)),
        facade.refund(tx, Basket(items=lines((MUG, 1))), order_id=ORDER_ID),
        facade.credit(tx, Decimal("7.50"), tax_rate=TAX, description="Goodwill: late delivery"),
    ]
    assert [(s.success, s.result_code) for s in steps] == [
        (True, 404),
        (True, 403),
        (True, 404),
        (True, 403),
        (True, 403),
    ]
    ledger = sandbox.gateway.ledger(tx)
    mug, pot = ledger["SKU-100"], ledger["SKU-200"]
    assert (mug.ordered, mug.delivered, mug.cancelled, mug.returned) == (3, 2, 1, 1)
    assert (pot.ordered, pot.delivered, pot.cancelled, pot.returned) == (1, 1, 0, 0)


def test_change_order_replaces_the_open_basket(facade, sandbox) -> None:
    tx = authorised(facade)
    small_pot = BasketItem("SKU-210", "Tea pot small", 1, Decimal("30.00"), TAX)
    new_basket = Basket(items=(MUG, small_pot), shipping=SHIPPING, discount=VOUCHER)
    assert new_basket.amount == Decimal("67.45")  # §8.9
    result = facade.change_order(tx, new_basket, order_id=ORDER_ID)
    assert result.success and result.result_code == 403 and result.subtype == "change-order"
    assert "SKU-210" in sandbox.gateway.ledger(tx)


def test_full_cancellation_with_the_empty_basket(facade, sandbox) -> None:
    tx = authorised(facade)
    result = facade.cancel(tx, None)
    assert result.success
    mug = sandbox.gateway.ledger(tx)["SKU-100"]
    assert mug.cancelled == 3 and mug.delivered == 0


def test_transaction_status_reports_the_booking(facade: RatepayFacade, api_log) -> None:
    tx = authorised(facade)
    facade.confirm_delivery(tx, Basket(items=lines((MUG, 1))))
    status = facade.transaction_status(tx)
    assert status.transaction_id == tx and status.report.found
    assert status.report.positions["SKU-100"] == PositionFigures(open=2, shipped=1)
    assert status.report.positions["SKU-200"] == PositionFigures(open=1)
    assert [r.operation for r in api_log.records[-2:]] == ["OAUTH_TOKEN", "TRANSACTION_STATUS"]


def test_transaction_status_without_oauth_client_is_unavailable(sandbox) -> None:
    settings = {k: v for k, v in sandbox.settings.items() if not k.startswith("OAUTH_")}
    facade = RatepayFacade(RatepaySettings.from_mapping(settings))
    with pytest.raises(StatusLookupUnavailable):
        facade.transaction_status("31-202401151000042")


# --- refusals are typed results ---------------------------------------------------------


def test_decline_for_last_name_ablehnung_carries_the_customer_message(facade, api_log) -> None:
    tx = facade.init_payment().transaction_id
    result = facade.request_payment(
        tx, example_customer("Ablehnung"), example_basket(), PaymentInfo("INVOICE")
    )
    assert not result.success and result.declined and not result.failed
    assert result.result_code == 401
    assert result.customer_message
    assert api_log.records[-1].success is False and api_log.records[-1].result_code == 401


def test_returning_more_than_delivered_is_refused_by_the_ledger(facade, sandbox) -> None:
    tx = authorised(facade)
    facade.confirm_delivery(tx, Basket(items=lines((MUG, 1))))
    result = facade.refund(tx, Basket(items=lines((MUG, 2))))
    assert not result.success and result.failed
    assert (result.status_code, result.reason_code, result.result_code) == ("ERROR", 2300, 150)
    assert sandbox.gateway.ledger(tx)["SKU-100"].returned == 0


def test_cancelling_a_delivered_unit_is_refused(facade) -> None:
    tx = authorised(facade)
    facade.confirm_delivery(tx, Basket(items=lines((MUG, 3))))
    result = facade.cancel(tx, Basket(items=lines((MUG, 1))))
    assert result.failed and result.reason_code == 2300


def test_follow_up_on_an_unknown_transaction_fails_with_its_reason(facade) -> None:
    result = facade.confirm_payment("31-209901019999999", ORDER_ID)
    assert result.failed and result.result_code == 150 and result.reason_text


# --- free text round trip --------------------------------------------------------------


def test_free_text_with_xml_specials_round_trips(facade, sandbox) -> None:
    mug = BasketItem("SKU-&<1>", 'Mug "Kaffee & Kuchen"', 1, Decimal("12.50"), TAX)
    tx = facade.init_payment().transaction_id
    result = facade.request_payment(
        tx, example_customer(), Basket(items=(mug,)), PaymentInfo("INVOICE")
    )
    assert result.success
    received = sandbox.gateway.received[-1].request_xml
    assert b"Mug &quot;Kaffee &amp; Kuchen&quot;" in received or (
        b'Mug "Kaffee &amp; Kuchen"' in received
    )
    assert "SKU-&<1>" in sandbox.gateway.ledger(tx)
    delivered = facade.confirm_delivery(tx, Basket(items=(mug,)))
    assert delivered.success
    assert sandbox.gateway.ledger(tx)["SKU-&<1>"].delivered == 1


# --- faults: no false success, the attempt is logged -------------------------------------


def test_timeout_after_booking_raises_sent_true_and_is_logged(facade, sandbox, api_log) -> None:
    tx = authorised(facade)
    sandbox.gateway.faults.add(
        Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER", delay_s=3.0)
    )
    before = len(sandbox.gateway.received)
    with pytest.raises(RatepayTransportError) as caught:
        facade.confirm_delivery(tx, Basket(items=lines((MUG, 1))), order_id=ORDER_ID)
    assert caught.value.sent is True
    assert len(sandbox.gateway.received) == before + 1  # sent once, never re-sent
    last = api_log.records[-1]
    assert last.operation == "CONFIRMATION_DELIVER" and last.success is False
    assert last.error and "timeout" in last.error
    assert last.transaction_id == tx and last.order_ref == ORDER_ID
    # the gateway did book it: reconcile instead of re-sending
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 1


def test_http_500_is_a_transport_error(facade, sandbox, api_log) -> None:
    tx = authorised(facade)
    sandbox.gateway.faults.add(Fault("http_500", operation="PAYMENT_CHANGE"))
    with pytest.raises(RatepayTransportError) as caught:
        facade.cancel(tx, Basket(items=lines((MUG, 1))))
    assert caught.value.sent and caught.value.http_status == 500
    assert api_log.records[-1].http_status == 500 and api_log.records[-1].success is False


def test_malformed_xml_is_a_transport_error_not_a_success(facade, sandbox, api_log) -> None:
    tx = authorised(facade)
    sandbox.gateway.faults.add(Fault("malformed_xml", operation="CONFIRMATION_DELIVER"))
    with pytest.raises(RatepayTransportError, match=r"malformed|unusable"):
        facade.confirm_delivery(tx, Basket(items=lines((MUG, 1))))
    assert api_log.records[-1].response_xml  # the broken answer is kept for support


def test_dropped_connection_is_not_resent_for_a_booking_operation(facade, sandbox) -> None:
    tx = authorised(facade)
    sandbox.gateway.faults.add(Fault("drop", operation="PAYMENT_CHANGE"))
    before = len(sandbox.gateway.received)
    with pytest.raises(RatepayTransportError) as caught:
        facade.refund(tx, Basket(items=lines((MUG, 1))))
    assert caught.value.sent is True
    assert len(sandbox.gateway.received) - before <= 1


def test_result_code_fault_is_a_failed_result(facade, sandbox) -> None:
    sandbox.gateway.faults.add(Fault("result_code", operation="PAYMENT_INIT", result_code=150))
    result = facade.init_payment()
    assert not result.success and result.failed and result.result_code == 150


# --- validation before sending --------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f, tx: f.confirm_delivery(tx, Basket()), "no positions"),
        (
            lambda f, tx: f.request_payment(
                tx, example_customer(), Basket(shipping=SHIPPING), PaymentInfo("INVOICE")
            ),
            "no items",
        ),
        (lambda f, tx: f.confirm_delivery(tx, Basket(items=lines((MUG, 0)))), "at least 1"),
        (
            lambda f, tx: f.confirm_delivery(
                tx,
                Basket(items=(BasketItem("X", "X", 1, Decimal("5"), TAX, Decimal("1.00")),)),
            ),
            "discount",
        ),
        (
            lambda f, tx: f.request_payment(
                tx, example_customer(), example_basket(), PaymentInfo("ELV")
            ),
            "bank account",
        ),
        (
            lambda f, tx: f.request_payment(
                tx,
                example_customer(),
                example_basket(),
                PaymentInfo(
                    "INSTALLMENT",
                    InstallmentDetails(
                        Decimal("90"), 3, Decimal("30"), Decimal("30"), Decimal("9"), 2
                    ),
                    "DIRECT-DEBIT",
                ),
            ),
            "bank account",
        ),
        (
            lambda f, tx: f.request_payment(
                tx, example_customer(), example_basket(), PaymentInfo("PAYPAL")
            ),
            "unknown payment method",
        ),
        (lambda f, tx: f.confirm_payment("", ORDER_ID), "transaction id"),
        (lambda f, tx: f.refund(None, Basket(items=lines((MUG, 1)))), "transaction id"),
        (lambda f, tx: f.credit(tx, Decimal("-1"), tax_rate=TAX), "positive"),
    ],
)
def test_invalid_input_is_refused_before_sending(facade, sandbox, api_log, call, message) -> None:
    before = len(sandbox.gateway.received)
    with pytest.raises(RatepayValidationError, match=message):
        call(facade, "31-202401151000042")
    assert len(sandbox.gateway.received) == before
    assert api_log.records == []


def test_a_setting_xml_cannot_carry_is_refused_on_every_call(sandbox) -> None:
    """The requests' constant part is copied from a template made on first use: a setting
    that cannot be put into XML is refused on every call, and nothing is sent."""
    settings = RatepaySettings.from_mapping({**sandbox.settings, "SYSTEM_ID": "shop\x01"})
    log = MemoryApiLogSink()
    facade = RatepayFacade(settings, api_log=log)
    before = len(sandbox.gateway.received)
    for _ in range(2):
        with pytest.raises(RatepayValidationError, match="system-id"):
            facade.init_payment()
    assert len(sandbox.gateway.received) == before and log.records == []


def test_each_request_starts_from_a_clean_copy_of_the_constant_part(facade, api_log) -> None:
    """What one request adds to its head (transaction id, subtype, external, device token)
    does not show in the next one."""
    tx = authorised(facade)
    assert facade.cancel(tx, None, order_id=ORDER_ID).success
    assert facade.request_profile().success
    change, profile = api_log.records[-2].request_xml, api_log.records[-1].request_xml
    assert 'subtype="cancellation"' in change and "<transaction-id>" in change
    assert "<external>" in change
    assert "subtype" not in profile and "<transaction-id>" not in profile
    assert "<external>" not in profile and "<customer-device>" not in profile
    assert profile.count("<securitycode>") == 1 and profile.count("<meta>") == 1


# --- the security code never leaks ---------------------------------------------------------


def test_security_code_is_masked_in_log_records_and_log_lines(
    facade, sandbox, api_log, caplog: pytest.LogCaptureFixture
) -> None:
    secret = sandbox.settings["SECURITY_CODE"]
    caplog.set_level(logging.DEBUG)
    tx = authorised(facade)
    facade.request_payment(
        tx, example_customer("Ablehnung"), example_basket(), PaymentInfo("INVOICE")
    )
    sandbox.gateway.faults.add(Fault("http_500", operation="PAYMENT_CHANGE"))
    with pytest.raises(RatepayTransportError) as caught:
        facade.cancel(tx, None)
    assert secret not in str(caught.value)
    assert secret not in repr(facade) and secret not in repr(facade.settings)
    assert len(api_log.records) >= 4
    for record in api_log.records:
        assert secret not in repr(record)
    assert "<securitycode>********</securitycode>" in api_log.records[0].request_xml
    assert secret not in caplog.text
    assert "RatePAY PAYMENT_REQUEST" in caplog.text  # the log lines exist
