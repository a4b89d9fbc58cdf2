"""RatePAY's codes the engine acts on: 730 under result 150 is a decline, three payment attempts
per order in 24 hours, a CALCULATION_REQUEST plan only with a usable reason, method locks shown,
and the instalment calculator whose plan is the one the PAYMENT_REQUEST sends.

Over HTTP against the sandbox; the engine scenarios on every test database.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner
from lxml import etree

from ratepay_oms.cli import _mount, cli
from ratepay_oms.demo import calls_of, demo_engine, example_order
from ratepay_oms.plugins.ratepay.installments import InstallmentUnavailable, quote
from ratepay_oms.ratepay import PaymentInfo, RatepayFacade, RatepaySettings
from ratepay_oms.ratepay.examples import example_basket, example_customer
from ratepay_oms.ratepay.xml import q
from ratepay_oms.sandbox.faults import Fault


@pytest.fixture
def facade(sandbox) -> RatepayFacade:
    return RatepayFacade(RatepaySettings.from_mapping(sandbox.settings))


def test_730_under_result_150_is_a_decline_with_the_customer_message(facade) -> None:
    tx = facade.init_payment().transaction_id
    customer = example_customer()
    unknown = type(customer)(**{**vars(customer), "last_name": "Unbekannt"})
    result = facade.request_payment(tx, unknown, example_basket(), PaymentInfo("INVOICE"))
    assert (result.status_code, result.result_code, result.reason_code) == ("ERROR", 150, 730)
    assert result.declined and not result.failed and not result.success
    assert result.customer_message and "Identität" in result.customer_message


def test_a_502_with_an_unusable_reason_is_no_plan(facade, sandbox) -> None:
    usable = quote(facade, Decimal("230.00"), months=12)
    assert usable.reason_code in (603, 671, 688, 689, 695, 696, 697, 698, 699)
    sandbox.gateway.faults.add(
        Fault("reason_code", operation="CALCULATION_REQUEST", reason_code=650, times=1)
    )
    answer = facade.installment_calculation(Decimal("230.00"), months=12)
    assert answer.result_code == 502 and answer.reason_code == 650
    assert "installment-calculation-result" in (answer.exchange.response_xml or "")
    assert not answer.success and answer.installment_plan is None  # plan-shaped, not usable
    sandbox.gateway.faults.add(
        Fault("reason_code", operation="CALCULATION_REQUEST", reason_code=650, times=1)
    )
    with pytest.raises(InstallmentUnavailable, match="502/650"):
        quote(facade, Decimal("230.00"), months=12)


def test_an_adjusted_plan_carries_ratepays_notice(facade, sandbox) -> None:
    sandbox.gateway.faults.add(
        Fault("reason_code", operation="CALCULATION_REQUEST", reason_code=697, times=1)
    )
    adjusted = quote(facade, Decimal("230.00"), rate=Decimal("21.00"))
    assert adjusted.adjusted and adjusted.notice and "adjusted" in adjusted.notice


# --------------------------------------------------------------------------- the engine


@pytest.fixture
def engine(server_db_url, sandbox):
    eng = demo_engine(server_db_url, sandbox.settings)
    yield eng
    eng.close()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _show(url: str, sandbox, ref: str) -> tuple[str, dict]:
    _mount()
    env = {"RATEPAY_OMS_DATABASE_URL": url, "COLUMNS": "200"}
    env |= {f"RATEPAY_{k}": v for k, v in sandbox.settings.items()}
    text = CliRunner().invoke(cli, ["order", "show", ref], env=env)
    assert text.exit_code == 0, text.output
    data = CliRunner().invoke(cli, ["order", "show", ref, "--json"], env=env)
    return text.output, json.loads(data.output)


def test_buyer_identity_decline_takes_the_declined_path(engine, sandbox, server_db_url) -> None:
    ref = f"C-{uuid.uuid4().hex[:8]}"
    engine.place_order(example_order(ref, last_name="Unbekannt"), now=_now())
    assert {i.state for i in engine.order(ref).items} == {"payment request declined"}
    text, data = _show(server_db_url, sandbox, ref)
    assert data["payment"]["reason_code"] == "730"
    assert "Identität" in data["payment"]["customer_message"]
    assert "RatePAY to the customer:" in text


def test_a_risk_decline_shows_the_method_lock(engine, sandbox, server_db_url) -> None:
    ref = f"C-{uuid.uuid4().hex[:8]}"
    engine.place_order(example_order(ref, last_name="Ablehnung"), now=_now())
    assert {i.state for i in engine.order(ref).items} == {"payment request declined"}
    text, data = _show(server_db_url, sandbox, ref)
    assert "703" in data["payment"]["method_locked"]
    assert "method locked: RatePAY reason 703" in text and "another payment method" in text


def test_the_fourth_payment_attempt_in_24_hours_is_refused_locally(engine, sandbox) -> None:
    sandbox.gateway.faults.add(
        Fault("result_code", operation="PAYMENT_REQUEST", reason_code=2100, times=5)
    )
    ref = f"C-{uuid.uuid4().hex[:8]}"
    now = _now()
    engine.place_order(example_order(ref), now=now)
    for attempt in (2, 3):
        assert {i.state for i in engine.order(ref).items} == {"payment request invalid"}
        engine.trigger("retry payment request", ref, now=now + timedelta(hours=attempt))
    sent = sum(1 for c in calls_of(sandbox.gateway.received) if c.operation == "PAYMENT_REQUEST")
    inits = sum(1 for c in calls_of(sandbox.gateway.received) if c.operation == "PAYMENT_INIT")
    assert sent == 3

    fourth = engine.trigger("retry payment request", ref, now=now + timedelta(hours=4))
    assert {i.state for i in engine.order(ref).items} == {"payment request invalid"}
    calls = calls_of(sandbox.gateway.received)
    assert sum(1 for c in calls if c.operation == "PAYMENT_REQUEST") == 3  # nothing sent
    assert sum(1 for c in calls if c.operation == "PAYMENT_INIT") == inits
    history = engine.history(ref)
    assert fourth is not None and history
    from sqlalchemy import select

    from ratepay_oms.persistence.payment import RatepayItemOutcome

    with engine.session() as s:
        message = s.scalar(
            select(RatepayItemOutcome.message).order_by(RatepayItemOutcome.id.desc()).limit(1)
        )
    assert "3 payment attempts" in message and "after" in message

    # a day after the first attempt, the next one goes out again
    engine.trigger("retry payment request", ref, now=now + timedelta(hours=24, minutes=1))
    sent = sum(1 for c in calls_of(sandbox.gateway.received) if c.operation == "PAYMENT_REQUEST")
    assert sent == 4


def test_the_calculator_plan_is_the_one_the_payment_request_sends(
    engine, sandbox, server_db_url
) -> None:
    order = example_order(f"C-{uuid.uuid4().hex[:8]}", "INSTALLMENT")
    amount = Decimal("331.45")  # the example basket plus the espresso machine
    shown = engine.calculate_installment(amount, months=12)
    assert shown.plan.number_of_rates == 12
    engine.place_order(order, now=_now())
    assert {i.state for i in engine.order(order["order_ref"]).items} == {"ready for shipment"}
    request = next(
        etree.fromstring(e.request_xml)
        for e in reversed(sandbox.gateway.received)
        if e.operation == "PAYMENT_REQUEST"
    )
    assert request.find(f".//{q('shopping-basket')}").get("amount") == str(amount)
    details = request.find(f".//{q('installment-details')}")
    sent = {etree.QName(el).localname: Decimal(el.text) for el in details}
    assert sent == {
        "installment-number": shown.details.number_of_rates,
        "installment-amount": shown.details.rate,
        "last-installment-amount": shown.details.last_rate,
        "interest-rate": shown.details.interest_rate,
        "payment-firstday": shown.details.payment_firstday,
    }
    assert request.findtext(f".//{q('payment')}/{q('amount')}") == str(shown.plan.total_amount)

    _mount()
    env = {"RATEPAY_OMS_DATABASE_URL": server_db_url}
    env |= {f"RATEPAY_{k}": v for k, v in sandbox.settings.items()}
    cli_plan = CliRunner().invoke(cli, ["installment", "calc", "331.45", "--months", "12",
                                        "--json"], env=env)
    assert cli_plan.exit_code == 0, cli_plan.output
    assert json.loads(cli_plan.output)["plan"]["rate"] == str(shown.plan.rate)
    table = CliRunner().invoke(cli, ["installment", "calc", "331.45", "--months", "12"], env=env)
    assert "monthly rate" in table.output and str(shown.plan.rate) in table.output


def test_installment_calc_usage_and_refusals(engine, sandbox, server_db_url) -> None:
    _mount()
    env = {"RATEPAY_OMS_DATABASE_URL": server_db_url}
    env |= {f"RATEPAY_{k}": v for k, v in sandbox.settings.items()}
    both = CliRunner().invoke(cli, ["installment", "calc", "230", "--months", "12", "--rate",
                                    "20"], env=env)
    assert both.exit_code == 2
    bad = CliRunner().invoke(cli, ["installment", "calc", "12.345", "--months", "12"], env=env)
    assert bad.exit_code == 2 and "two decimals" in bad.output
    with pytest.raises(InstallmentUnavailable, match=r"650|amount"):
        engine.calculate_installment(Decimal("50.00"), months=12)  # below the profile minimum
