"""RatePAY's Transaction Status API end to end: the sandbox's OAuth server and status endpoint,
the facade's token handling, and reconciliation of lost answers through the real shape.

Everything goes over HTTP on loopback; the engine scenarios run on every test database.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import create_engine, update

from ratepay_oms.cli import cli
from ratepay_oms.demo import calls_of, demo_engine, example_order
from ratepay_oms.persistence.models import Intent
from ratepay_oms.plugins.ratepay import reconcile as recon
from ratepay_oms.ratepay import (
    MemoryApiLogSink,
    PositionFigures,
    RatepayFacade,
    RatepaySettings,
    StatusApiAuthError,
    StatusReport,
)
from ratepay_oms.ratepay.examples import MUG, example_basket, example_customer, lines
from ratepay_oms.ratepay.status_api import TokenCache
from ratepay_oms.ratepay.types import Basket, PaymentInfo
from ratepay_oms.sandbox.faults import Fault
from ratepay_oms.sandbox.status_api import DEFAULT_AUDIENCE
from ratepay_oms.sandbox.testing import RunningSandbox

# --------------------------------------------------------------------------- the sandbox


def _token(sandbox: RunningSandbox, **override: str) -> requests.Response:
    oauth = sandbox.gateway.config.oauth
    body = {
        "client_id": oauth.client_id,
        "client_secret": oauth.client_secret,
        "audience": oauth.audience,
        "grant_type": "client_credentials",
        **override,
    }
    return requests.post(sandbox.token_url, json=body, timeout=5)


@pytest.mark.parametrize(
    "override",
    [
        {"client_id": "someone-else"},
        {"client_secret": "wrong-secret-0000"},
        {"audience": "https://api.ratepay.com/order/status/v2/transactions"},
        {"grant_type": "password"},
    ],
    ids=["client_id", "client_secret", "audience", "grant_type"],
)
def test_token_endpoint_refuses_a_wrong_field_with_401(sandbox, override) -> None:
    answer = _token(sandbox, **override)
    assert answer.status_code == 401
    assert sandbox.gateway.config.oauth.client_secret not in answer.text


def test_token_endpoint_issues_a_bearer_token(sandbox) -> None:
    answer = _token(sandbox)
    assert answer.status_code == 200
    data = answer.json()
    assert data["token_type"] == "Bearer" and data["expires_in"] == 1800
    assert len(data["access_token"]) >= 32
    form = requests.post(sandbox.token_url, data={"client_id": "x"}, timeout=5)
    assert form.status_code == 415  # the documented request is JSON


def _authorised(sandbox: RunningSandbox) -> tuple[RatepayFacade, str]:
    facade = RatepayFacade(RatepaySettings.from_mapping(sandbox.settings))
    init = facade.init_payment()
    result = facade.request_payment(
        init.transaction_id,
        example_customer(),
        example_basket(),
        PaymentInfo("INVOICE"),
        order_id="100045",
    )
    assert result.success
    return facade, init.transaction_id


def test_status_endpoint_checks_token_content_type_accept_and_id(sandbox) -> None:
    _, tx = _authorised(sandbox)
    token = _token(sandbox).json()["access_token"]
    url = f"{sandbox.status_url}/{tx}"
    good = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    no_token = {"Content-Type": "application/json"}
    assert requests.get(url, headers=no_token, timeout=5).status_code == 401
    bad_token = {**good, "Authorization": "Bearer not-a-token"}
    assert requests.get(url, headers=bad_token, timeout=5).status_code == 401
    no_type = {"Authorization": f"Bearer {token}"}
    assert requests.get(url, headers=no_type, timeout=5).status_code == 415
    xml_only = {**good, "Accept": "text/xml"}
    assert requests.get(url, headers=xml_only, timeout=5).status_code == 406
    unknown = requests.get(f"{sandbox.status_url}/31-209901010000001", headers=good, timeout=5)
    assert unknown.status_code == 404

    plain = requests.get(url, headers=good, timeout=5).json()
    assert set(plain) == {"general_order_information"}  # without include
    assert plain["general_order_information"]["transaction_id"] == tx
    full = requests.get(url, headers=good, params={"include": "all"}, timeout=5).json()
    assert set(full) == {"general_order_information", "basket", "payment_information"}
    assert full["payment_information"]["maximum_processing_offset_in_hours"] == 0
    items = full["basket"]["current_items"][0]["shop_items"]["open_items"]
    assert {(i["identification_number"], i["quantity"]) for i in items} == {
        ("SKU-100", 3),
        ("SKU-200", 1),
    }
    basket_only = requests.get(url, headers=good, params={"include": "basket"}, timeout=5).json()
    assert set(basket_only) == {"general_order_information", "basket"}


def test_a_transaction_that_only_was_initialised_has_no_status(sandbox) -> None:
    facade = RatepayFacade(RatepaySettings.from_mapping(sandbox.settings))
    tx = facade.init_payment().transaction_id
    assert sandbox.status(tx).status_code == 404
    assert facade.transaction_status(tx).report.found is False


# --------------------------------------------------------------------------- the facade


def test_the_token_is_reused_and_renewed_once_on_a_401(sandbox) -> None:
    api_log = MemoryApiLogSink()
    facade, tx = _authorised(sandbox)
    facade.api_log = api_log
    facade.confirm_delivery(tx, Basket(items=lines((MUG, 2))))
    first = facade.transaction_status(tx)
    second = facade.transaction_status(tx)
    assert sandbox.gateway.oauth.issued == 1  # one token for both lookups
    assert first.report.positions["SKU-100"] == second.report.positions["SKU-100"]
    assert first.report.positions["SKU-100"] == PositionFigures(open=1, shipped=2)

    sandbox.gateway.oauth.revoke_all()  # the token dies before its time
    third = facade.transaction_status(tx)
    assert third.report.positions["SKU-100"] == PositionFigures(open=1, shipped=2)
    assert sandbox.gateway.oauth.issued == 2
    ops = [(r.operation, r.http_status) for r in api_log.records]
    assert ops[-3:] == [
        ("TRANSACTION_STATUS", 401),
        ("OAUTH_TOKEN", 200),
        ("TRANSACTION_STATUS", 200),
    ]
    assert all("access_token" not in (r.response_xml or "") or "********" in r.response_xml
               for r in api_log.records)


def test_a_refused_client_is_a_settings_problem_named_without_the_secret(sandbox) -> None:
    secret = "not-the-right-secret-123456"
    facade = RatepayFacade(
        RatepaySettings.from_mapping({**sandbox.settings, "OAUTH_CLIENT_SECRET": secret}),
        api_log=MemoryApiLogSink(),
    )
    with pytest.raises(StatusApiAuthError) as refused:
        facade.transaction_status("31-202401151000042")
    assert "RATEPAY_OAUTH_CLIENT_SECRET" in str(refused.value)
    assert secret not in str(refused.value)
    (record,) = facade.api_log.records
    assert record.operation == "OAUTH_TOKEN" and record.http_status == 401
    assert secret not in repr(record)


def test_token_cache_renews_shortly_before_expiry() -> None:
    clock = [1000.0]
    issued: list[str] = []

    def fetch() -> tuple[str, float]:
        issued.append(f"t{len(issued)}")
        return issued[-1], 1800.0

    cache = TokenCache(fetch, clock=lambda: clock[0])
    assert cache.get() == "t0"
    clock[0] += 1739  # 61 s left: still good
    assert cache.get() == "t0"
    clock[0] += 2  # 59 s left: renewed before it can expire mid-request
    assert cache.get() == "t1"
    cache.drop("t0")  # an old token's 401 does not throw away the new one
    assert cache.get() == "t1"
    cache.drop("t1")
    assert cache.get() == "t2"


def test_default_status_settings_per_mode() -> None:
    base = {"PROFILE_ID": "P", "SECURITY_CODE": "S" * 32}
    test = RatepaySettings.from_mapping(base)
    live = RatepaySettings.from_mapping({**base, "MODE": "live"})
    assert test.status_url == "https://api-integration.ratepay.com/order/status/v2/transactions"
    assert live.status_url == "https://api.ratepay.com/order/status/v2/transactions"
    assert live.audience == live.status_url
    assert test.oauth_token_url == "https://oauth.ratepay.com/oauth/token"
    assert not test.status_lookup_configured
    custom = RatepaySettings.from_mapping(
        {**base, "STATUS_API_URL": "http://127.0.0.1:1/x/", "OAUTH_CLIENT_ID": "c",
         "OAUTH_CLIENT_SECRET": "geheim-geheim"}
    )
    assert custom.status_url == "http://127.0.0.1:1/x" and custom.status_lookup_configured
    assert "geheim" not in repr(custom)


# --------------------------------------------------------------------------- verdicts (pure)


def _summary(field: str, before: int, add: int, **extra) -> dict:
    return {
        "operation": "PAYMENT_CHANGE" if field != "delivered" else "CONFIRMATION_DELIVER",
        "field": field,
        "positions": {"SKU-100": {"before": before, "add": add}, "shipping": {"before": "0",
                                                                             "add": "4.95"}},
        "ordered": {"SKU-100": 3, "SKU-200": 1},
        "planned_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
        **extra,
    }


def _report(offset: int = 0, **positions: PositionFigures) -> StatusReport:
    return StatusReport("tx", True, processing_offset_hours=Decimal(offset),
                        positions=positions)


def test_cancelled_units_are_the_ones_in_no_list() -> None:
    summary = _summary("cancelled", before=0, add=1)
    booked = recon.verdict(summary, _report(**{"SKU-100": PositionFigures(open=2)}))
    assert booked.outcome == recon.BOOKED
    not_booked = recon.verdict(summary, _report(**{"SKU-100": PositionFigures(open=3)}))
    assert not_booked.outcome == recon.NOT_BOOKED


def test_a_returned_unit_still_counts_as_delivered() -> None:
    summary = _summary("delivered", before=1, add=2)
    report = _report(**{"SKU-100": PositionFigures(shipped=2, returned=1)})
    assert recon.verdict(summary, report).outcome == recon.BOOKED


def test_not_booked_inside_the_processing_window_waits() -> None:
    summary = _summary("delivered", before=0, add=3)
    report = _report(offset=1, **{"SKU-100": PositionFigures(open=3)})
    verdict = recon.verdict(summary, report)
    assert verdict.outcome == recon.WAIT
    with pytest.raises(recon.StatusNotFinal) as later_on:
        verdict.reconciled()
    planned = datetime.fromisoformat(summary["planned_at"])
    assert later_on.value.at == planned + timedelta(hours=1) + recon.SEND_MARGIN
    after = later_on.value.at + timedelta(seconds=1)
    assert recon.verdict(summary, report, now=after).outcome == recon.NOT_BOOKED


@pytest.mark.parametrize(
    ("report", "why"),
    [
        (_report(**{"SKU-100": PositionFigures(shipped=1, open=2)}), "fits neither"),
        (_report(**{"SKU-999": PositionFigures(open=1)}), "unknown position"),
        (_report(**{"SKU-100": PositionFigures(open=3, shipped=1)}), "more than ordered"),
        (StatusReport("tx", True, processing_offset_hours=None), "no window"),
        (StatusReport("tx", False), "404 after a booking call"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_anything_else_is_left_to_a_person(report, why) -> None:
    verdict = recon.verdict(_summary("delivered", before=0, add=3), report)
    assert verdict.outcome == recon.UNCLEAR, why
    assert verdict.reconciled() is None


def test_payment_request_reads_presence_and_payment_status() -> None:
    summary = {"operation": "PAYMENT_REQUEST", "planned_at": "2000-01-01T00:00:00+00:00"}
    gone = StatusReport("tx", False, processing_offset_hours=Decimal(24))
    assert recon.verdict(summary, gone).outcome == recon.NOT_BOOKED
    accepted = recon.verdict(summary, StatusReport("tx", True, payment_status="ACCEPTED"))
    assert (accepted.outcome, accepted.answer) == (recon.BOOKED, {"accepted": True})
    declined = recon.verdict(summary, StatusReport("tx", True, payment_status="DECLINED"))
    assert (declined.outcome, declined.answer) == (recon.BOOKED, {"accepted": False})
    odd = recon.verdict(summary, StatusReport("tx", True, payment_status="SOMETHING_NEW"))
    assert odd.outcome == recon.UNCLEAR
    fresh = {**summary, "planned_at": datetime.now(UTC).isoformat()}
    assert recon.verdict(fresh, gone).outcome == recon.WAIT  # may still show up
    assert recon.verdict(fresh, StatusReport("tx", False)).outcome == recon.UNCLEAR


# --------------------------------------------------------------------------- the engine


@pytest.fixture
def db_url(fresh_db_url):
    """A database of the test's own: these tests tick everything due and make every open
    intent due (``_due``), so another test's leftover intent would be reconciled against this
    test's sandbox and show up in its call counts."""
    return fresh_db_url


@pytest.fixture
def engine(db_url, sandbox):
    eng = demo_engine(db_url, sandbox.settings)
    yield eng
    eng.close()


def _ready(engine) -> str:
    ref = f"S-{uuid.uuid4().hex[:8]}"
    engine.place_order(example_order(ref), now=_now())
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    return ref


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _count(sandbox, operation: str, subtype: str | None = None) -> int:
    return sum(
        1
        for c in calls_of(sandbox.gateway.received)
        if c.operation == operation and (subtype is None or c.subtype == subtype)
    )


def _due(url: str) -> None:
    """Make every open intent due for reconciliation (its backoff runs on the wall clock)."""
    db = create_engine(url)
    with db.begin() as conn:
        conn.execute(update(Intent).values(reconcile_at=datetime(2000, 1, 1)))
    db.dispose()


def _window(sandbox, **changes) -> None:
    oauth = sandbox.gateway.oauth
    oauth.config = replace(oauth.config, **changes)


def test_lost_return_answer_is_applied_from_the_status_api(engine, sandbox) -> None:
    ref = _ready(engine)
    engine.trigger("ship", ref, now=_now())
    item = engine.order(ref).items[0]
    sandbox.gateway.faults.add(
        Fault("timeout_after_booking", operation="PAYMENT_CHANGE", subtype="return")
    )
    engine.trigger("refund payment", ref, [item.id], now=_now())
    assert engine.order(ref).items[0].intent_id is not None
    engine.tick(now=_now() + timedelta(seconds=1))
    assert engine.order(ref).items[0].state in ("refund succeeded", "completed")
    assert _count(sandbox, "PAYMENT_CHANGE", "return") == 1  # booked once, never re-sent
    (settled,) = [i for i in engine.intents(ref, open_only=False) if "Refund" in i.command]
    assert settled.resolution == "reconciled_booked"
    assert "SKU-100 returned 1" in (settled.note or "")


def test_not_booked_inside_the_window_waits_then_is_sent_once_more(
    engine, sandbox, db_url
) -> None:
    _window(sandbox, processing_offset_hours=1)
    ref = _ready(engine)
    sandbox.gateway.faults.add(Fault("http_500", operation="CONFIRMATION_DELIVER", times=1))
    engine.trigger("ship", ref, now=_now())
    engine.tick(now=_now() + timedelta(seconds=1))
    (intent,) = engine.intents(ref)
    assert intent.status == "pending" and "processing window" in (intent.last_error or "")
    assert _count(sandbox, "CONFIRMATION_DELIVER") == 1  # inconclusive: never re-sent
    assert {i.state for i in engine.order(ref).items} == {"shipped"}

    _window(sandbox, processing_offset_hours=0)  # the window has passed
    _due(db_url)
    engine.tick(now=_now() + timedelta(seconds=2))
    assert {i.state for i in engine.order(ref).items} == {"ready for refund"}
    results = [c.result for c in calls_of(sandbox.gateway.received)
               if c.operation == "CONFIRMATION_DELIVER"]
    assert results == ["HTTP 500", "404"]  # sent exactly once more


def test_a_booking_that_does_not_show_yet_is_waited_for_and_never_sent_twice(
    engine, sandbox, db_url
) -> None:
    _window(sandbox, processing_offset_hours=1, status_lag_s=3600)
    ref = _ready(engine)
    sandbox.gateway.faults.add(Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER"))
    engine.trigger("ship", ref, now=_now())
    tx = next(t for t in sandbox.gateway.transactions.values() if t.order_id == ref)
    assert sandbox.gateway.ledger(tx.transaction_id)["SKU-100"].delivered == 3
    _due(db_url)
    engine.tick(now=_now() + timedelta(seconds=1))
    (intent,) = engine.intents(ref)
    assert intent.status == "pending"  # RatePAY shows nothing yet, inside its window: wait

    _window(sandbox, status_lag_s=0)  # RatePAY has processed it
    _due(db_url)
    engine.tick(now=_now() + timedelta(seconds=2))
    assert {i.state for i in engine.order(ref).items} == {"ready for refund"}
    assert _count(sandbox, "CONFIRMATION_DELIVER") == 1


def test_an_answer_that_fits_neither_waits_for_a_person(engine, sandbox) -> None:
    ref = _ready(engine)
    sandbox.gateway.faults.add(Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER"))
    engine.trigger("ship", ref, now=_now())
    tx = next(t for t in sandbox.gateway.transactions.values() if t.order_id == ref)
    sandbox.gateway.transactions[tx.transaction_id].positions["SKU-100"].delivered = 2
    engine.tick(now=_now() + timedelta(seconds=1))
    (intent,) = engine.intents(ref)
    assert intent.status == "unknown"  # a person decides (ratepay-oms intents resolve)
    assert _count(sandbox, "CONFIRMATION_DELIVER") == 1


def test_payment_request_500_is_not_booked_and_sent_again_with_a_new_transaction(
    engine, sandbox
) -> None:
    sandbox.gateway.faults.add(Fault("http_500", operation="PAYMENT_REQUEST", times=1))
    ref = f"S-{uuid.uuid4().hex[:8]}"
    engine.place_order(example_order(ref), now=_now())
    engine.tick(now=_now() + timedelta(seconds=1))
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    assert _count(sandbox, "PAYMENT_REQUEST") == 2 and _count(sandbox, "PAYMENT_INIT") == 2


def test_sandbox_serve_prints_the_oauth_settings_to_export_without_the_secret(tmp_path) -> None:
    secret = f"srv-{uuid.uuid4().hex}"
    env = {**os.environ, "RATEPAY_SANDBOX_OAUTH_CLIENT_SECRET": secret, "COLUMNS": "200"}
    command = [sys.executable, "-c", "from ratepay_oms.cli import main; main()",
               "sandbox", "serve", "--port", "0", "--processing-offset-hours", "2"]
    out = tmp_path / "serve.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        text = ""
        while "Faults:" not in text and time.monotonic() < deadline:
            time.sleep(0.05)
            text = out.read_text()
        exported = dict(re.findall(r"(RATEPAY_[A-Z_]+)=(\S+)", text))
        assert exported["RATEPAY_OAUTH_CLIENT_SECRET"] == "********"
        assert exported["RATEPAY_OAUTH_AUDIENCE"] == DEFAULT_AUDIENCE
        assert exported["RATEPAY_STATUS_PROCESSING_OFFSET_HOURS"] == "2"
        token = requests.post(
            exported["RATEPAY_OAUTH_TOKEN_URL"],
            json={"client_id": exported["RATEPAY_OAUTH_CLIENT_ID"], "client_secret": secret,
                  "audience": exported["RATEPAY_OAUTH_AUDIENCE"],
                  "grant_type": "client_credentials"},
            timeout=5,
        )
        assert token.status_code == 200  # what it printed is what it accepts
        answer = requests.get(
            exported["RATEPAY_STATUS_API_URL"] + "/31-209901010000001",
            headers={"Authorization": f"Bearer {token.json()['access_token']}",
                     "Content-Type": "application/json"},
            timeout=5,
        )
        assert answer.status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    assert secret not in out.read_text()


def test_a_second_return_of_the_same_article_waits_for_the_first_in_doubt(
    engine, sandbox, db_url
) -> None:
    """Two units of one article returned one by one while the first return's answer is lost:
    the second is held until the first is reconciled (its "before" would be stale), and both
    end booked exactly once, none left for a person."""
    ref = _ready(engine)
    engine.trigger("ship", ref, now=_now())
    first, second = engine.order(ref).items[:2]
    sandbox.gateway.faults.add(
        Fault("timeout_after_booking", operation="PAYMENT_CHANGE", subtype="return", times=1)
    )
    engine.trigger("refund payment", ref, [first.id], now=_now())
    assert engine.order(ref).items[0].intent_id is not None  # in doubt
    held = engine.trigger("refund payment", ref, [second.id], now=_now())
    assert _count(sandbox, "PAYMENT_CHANGE", "return") == 1  # held: not sent beside it
    ((item_id, why),) = held.held
    assert item_id == second.id and "in doubt" in why and not held.errors
    assert engine.order(ref).items[1].state == "ready for refund"
    env = {"RATEPAY_OMS_DATABASE_URL": db_url, "COLUMNS": "250"}
    env.update({f"RATEPAY_{k}": v for k, v in sandbox.settings.items()
                if not k.startswith("OAUTH_")})
    again = CliRunner().invoke(
        cli, ["event", "refund payment", ref, "--item", str(second.id)], env=env
    )
    assert again.exit_code == 0, again.output  # accepted: it goes once the first is settled
    assert f"item {second.id}: held:" in again.output and "in doubt" in again.output
    shown = CliRunner().invoke(cli, ["order", "show", ref, "--items"], env=env)
    assert "held:" in shown.output, shown.output
    assert _count(sandbox, "PAYMENT_CHANGE", "return") == 1
    _due(db_url)
    engine.tick(now=_now() + timedelta(seconds=1))
    engine.tick(now=_now() + timedelta(minutes=10))
    states = {i.id: i.state for i in engine.order(ref).items}
    assert states[first.id] in ("refund succeeded", "completed")
    assert states[second.id] in ("refund succeeded", "completed")
    assert _count(sandbox, "PAYMENT_CHANGE", "return") == 2
    assert not engine.intents(ref)  # none open, none for a person
    tx = next(t for t in sandbox.gateway.transactions.values() if t.order_id == ref)
    assert sandbox.gateway.ledger(tx.transaction_id)["SKU-100"].returned == 2
