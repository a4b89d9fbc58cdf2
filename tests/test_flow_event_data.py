"""Event data and profiles through the engine, over real HTTP against the sandbox, on every
database: ``ship`` with an invoice id and tracking ids (stored with the history, sent with the
CONFIRMATION_DELIVER in the shop's time zone, the due date from the payment term), bad data
refused without a call, and an order outside its profile refused before any call."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

import pytest
from lxml import etree

from ratepay_oms.cli import main
from ratepay_oms.demo import demo_engine, example_order
from ratepay_oms.plugins.ratepay.event_data import EventDataError, check_event_data
from ratepay_oms.plugins.ratepay.profiles import profiles_of, refresh
from ratepay_oms.ratepay.xml import RATEPAY_NS
from ratepay_oms.sandbox import SandboxConfig
from ratepay_oms.sandbox.testing import RunningSandbox, start_sandbox

NS = {"r": RATEPAY_NS}
NOW = datetime(2026, 6, 30, 22, 15)  # naive UTC: 1 July 00:15 in Berlin


@pytest.fixture
def engine(sandbox, server_db_url) -> Iterator:
    eng = demo_engine(server_db_url, {**sandbox.settings, "PAYMENT_TERM_DAYS": "14"})
    yield eng
    eng.close()


def _deliveries(sandbox) -> list[etree._Element]:
    return [etree.fromstring(e.request_xml) for e in sandbox.gateway.received
            if e.operation == "CONFIRMATION_DELIVER"]


def _place(engine, **changes) -> tuple[str, list[int]]:
    ref = f"E-{uuid.uuid4().hex[:8]}"
    order = example_order(ref)
    order.update(changes)
    view = engine.place_order(order, now=NOW)
    return ref, [i.id for i in view.items]


def test_ship_with_invoice_and_tracking_reaches_ratepay_and_the_history(engine, sandbox):
    ref, ids = _place(engine)
    data = {"invoice_id": "INV-2026-0042", "tracking_ids": ["00340434", "00340435"],
            "carrier": "dhl", "note": "two parcels"}
    result = engine.trigger("ship", ref, ids[:2], now=NOW, data=data)
    assert not result.errors
    assert {i.state for i in engine.order(ref).items if i.id in ids[:2]} == {"ready for refund"}
    (sent,) = _deliveries(sandbox)
    invoicing = {etree.QName(c).localname: c.text
                 for c in sent.find("r:content/r:invoicing", NS)}
    assert invoicing == {
        "invoice-id": "INV-2026-0042",
        "invoice-date": "2026-07-01T00:15:00",  # the shop's (Berlin) time of the event
        "delivery-date": "2026-07-01T00:15:00",
        "due-date": "2026-07-15T00:00:00",  # + PAYMENT_TERM_DAYS
    }
    assert [(i.get("provider"), i.text)
            for i in sent.iterfind("r:head/r:external/r:tracking/r:id", NS)] == [
        ("DHL", "00340434"), ("DHL", "00340435")]
    shipped = [h for h in engine.history(ref) if h.event == "ship"]
    assert [h.item_id for h in shipped] == ids[:2]
    assert all(h.data == data for h in shipped)  # as given; the command normalises the carrier
    unshipped = [h for h in engine.history(ref) if h.item_id not in ids[:2]]
    assert all(h.data is None for h in unshipped)


def test_a_delivery_without_data_sends_no_invoicing(engine, sandbox):
    ref, ids = _place(engine)
    engine.trigger("ship", ref, ids, now=NOW)
    (sent,) = _deliveries(sandbox)
    assert sent.find("r:content/r:invoicing", NS) is None
    assert sent.find("r:head/r:external/r:tracking", NS) is None


def test_a_bad_date_is_refused_without_a_call_and_corrected_by_a_retry(engine, sandbox):
    ref, ids = _place(engine)
    engine.trigger("ship", ref, ids, now=NOW,
                   data={"invoice_id": "INV-1", "invoice_date": "2026-07-01",
                         "due_date": "2026-06-01"})
    assert {i.state for i in engine.order(ref).items} == {"delivery invalid"}
    assert _deliveries(sandbox) == []
    engine.trigger("retry delivery confirmation", ref, now=NOW,
                   data={"invoice_id": "INV-1", "due_date": "2026-07-31"})
    assert {i.state for i in engine.order(ref).items} == {"ready for refund"}
    (sent,) = _deliveries(sandbox)
    assert sent.findtext("r:content/r:invoicing/r:due-date", namespaces=NS) == (
        "2026-07-31T00:00:00")
    retried = [h for h in engine.history(ref) if h.event == "retry delivery confirmation"]
    assert retried and all(h.data["due_date"] == "2026-07-31" for h in retried)


def test_the_console_checks_event_data_before_anything_moves(engine, capsys):
    ref, _ = _place(engine)
    code = main(["event", "ship", ref, "--db", engine.database_url,
                 "--tracking-id", "123", "--carrier", "Hermes"])
    err = capsys.readouterr().err
    assert code != 0 and "carrier 'HERMES' is not one RatePAY knows" in err
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    with pytest.raises(EventDataError, match="tracking ids need a carrier"):
        check_event_data({"tracking_ids": ["1"]})


def test_order_history_shows_the_data(engine, sandbox, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    for key, value in sandbox.settings.items():
        monkeypatch.setenv(f"RATEPAY_{key}", value)
    ref, ids = _place(engine)
    code = main(["event", "ship", ref, "--db", engine.database_url, "--item", str(ids[0]),
                 "--invoice-id", "INV-77", "--tracking-id", "00340434", "--carrier", "DHL",
                 "--data", "warehouse=Köln"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["order", "history", ref, "--db", engine.database_url, "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    ship = [r for r in rows if r["event"] == "ship"]
    assert ship[0]["data"] == {"invoice_id": "INV-77", "tracking_ids": ["00340434"],
                               "carrier": "DHL", "warehouse": "Köln"}


# --------------------------------------------------------------------------- profiles


@pytest.fixture
def strict_sandbox() -> Iterator[RunningSandbox]:
    running = start_sandbox(SandboxConfig(seed=2, tx_limit_max=Decimal("50.00")))
    try:
        yield running
    finally:
        running.stop()


def test_an_order_over_its_profiles_limit_is_refused_before_any_call(strict_sandbox,
                                                                     fresh_db_url):
    engine = demo_engine(fresh_db_url, strict_sandbox.settings)
    try:
        refresh(engine.session, profiles_of(engine.services), None, NOW)
        before = len(strict_sandbox.gateway.received)
        ref, _ = _place(engine)
        view = engine.order(ref)
        assert {i.state for i in view.items} == {"payment request declined"}
        assert len(strict_sandbox.gateway.received) == before  # no INIT, no REQUEST
        from ratepay_oms.console.inspect import order_detail

        detail = order_detail(engine, ref)
        assert (detail["payment"]["result_code"], detail["payment"]["reason_code"]) == (
            "401", "2006")
        from ratepay_oms.plugins.ratepay.payment_store import latest_outcome

        with engine.session() as s:
            outcome = latest_outcome(s, view.items[0].id, "payment_request")
        assert "82.45 is above the INVOICE maximum 50.00" in outcome.message
        assert outcome.reason_code == "2006"
        # a smaller order passes the same profile and is accepted by the gateway
        small, _ = _place(engine, items=[{"sku": "SKU-1", "name": "Pen", "quantity": 1,
                                          "unit_price_gross": "9.90", "tax_rate": "19"}],
                          shipping=None, discount=None)
        assert {i.state for i in engine.order(small).items} == {"ready for shipment"}
    finally:
        engine.close()


# --------------------------------------------------------------------------- several profiles

CH_SECRET = "c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2"


@pytest.fixture
def two_profile_sandbox() -> Iterator[RunningSandbox]:
    ch = SandboxConfig(profile_id="SHOP_CH", security_code=CH_SECRET,
                       billing_countries=("CH",), delivery_countries=("CH",),
                       currencies=("CHF",))
    running = start_sandbox(SandboxConfig(seed=3, billing_countries=("DE", "AT"),
                                          currencies=("EUR",), profiles=(ch,)))
    try:
        yield running
    finally:
        running.stop()


def test_each_order_goes_out_with_its_profiles_credentials(two_profile_sandbox, fresh_db_url,
                                                           tmp_path):
    from ratepay_oms.engine.engine import Engine
    from ratepay_oms.plugins.ratepay.services import ratepay_services
    from ratepay_oms.process.loader import default_process_dir

    sandbox = two_profile_sandbox
    toml = tmp_path / "ratepay.toml"
    toml.write_text(
        f'[ratepay]\nAPI_TEST_URL = "{sandbox.url}"\nSTATUS_API_URL = "{sandbox.status_url}"\n'
        '[ratepay.profiles.DE]\nPROFILE_ID = "INTEGRATION_TE_DACH"\n'
        '[ratepay.profiles.CH]\nPROFILE_ID = "SHOP_CH"\nVOUCHER_RULE = "prorata"\n',
        encoding="utf-8",
    )
    env = {"RATEPAY_PROFILE_DE_SECURITY_CODE": sandbox.settings["SECURITY_CODE"],
           "RATEPAY_PROFILE_CH_SECURITY_CODE": CH_SECRET}
    engine = Engine(fresh_db_url, process_dir=default_process_dir())
    engine.upgrade_db()
    engine.services.update(ratepay_services(engine.session, environ=env, toml_path=toml))
    try:
        refresh(engine.session, profiles_of(engine.services), None, NOW)  # countries known
        swiss = example_order(f"CH-{uuid.uuid4().hex[:6]}")
        swiss["currency"] = "CHF"
        swiss["customer"]["billing_address"].update(
            {"street": "Bahnhofstrasse 1", "zip_code": "8001", "city": "Zürich",
             "country_code": "CH"})
        ch_ref = engine.place_order(swiss).order_ref
        de_ref, _ = _place(engine)
        for ref in (ch_ref, de_ref):
            assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
        ch_ids = [i.id for i in engine.order(ch_ref).items]
        engine.trigger("ship", ch_ref, ch_ids[:2])
        by_tx = {t.order_id: t for t in sandbox.gateway.transactions.values() if t.order_id}
        assert by_tx[ch_ref].profile_id == "SHOP_CH"
        assert by_tx[de_ref].profile_id == "INTEGRATION_TE_DACH"
        # CH settles its voucher pro rata: two mugs carry 2 × −0.76 of the −5.00
        assert by_tx[ch_ref].positions["discount"].delivered == Decimal("-1.52")
        from ratepay_oms.console.inspect import order_detail

        assert order_detail(engine, ch_ref)["payment"]["profile"] == "CH"
        # an order no profile serves is refused with the reason, not sent
        french = example_order(f"FR-{uuid.uuid4().hex[:6]}")
        french["customer"]["billing_address"]["country_code"] = "FR"
        before = len(sandbox.gateway.received)
        fr_ref = engine.place_order(french).order_ref
        assert {i.state for i in engine.order(fr_ref).items} == {"payment request declined"}
        assert len(sandbox.gateway.received) == before
        for exchange in sandbox.gateway.received:
            assert CH_SECRET.encode() not in exchange.request_xml
    finally:
        engine.close()
