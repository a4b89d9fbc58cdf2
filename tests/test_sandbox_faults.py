"""Fault injection over real HTTP: each kind, its trigger rules, and the run-time endpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from lxml import etree

from ratepay_oms.ratepay.xml import RATEPAY_NS, parse_xml
from ratepay_oms.sandbox import Fault, FaultSpecError
from ratepay_oms.sandbox.faults import FaultSet
from ratepay_oms.sandbox.testing import (
    RunningSandbox,
    basket_xml,
    customer_xml,
    payment_xml,
    request_xml,
)

NS = {"r": RATEPAY_NS}


def post(sandbox: RunningSandbox, body: bytes, timeout: float = 5) -> requests.Response:
    return requests.post(sandbox.url, data=body, timeout=timeout)


def outcome(content: bytes) -> tuple[str, int, int]:
    p = parse_xml(content).find("r:head/r:processing", NS)
    return (
        p.find("r:status", NS).get("code"),
        int(p.find("r:reason", NS).get("code")),
        int(p.find("r:result", NS).get("code")),
    )


def authorised(sandbox: RunningSandbox) -> str:
    init = post(sandbox, request_xml("PAYMENT_INIT", sandbox.settings))
    tx = parse_xml(init.content).findtext("r:head/r:transaction-id", namespaces=NS)
    basket = basket_xml([("SKU-100", 3, "12.50")])
    pr = post(
        sandbox,
        request_xml(
            "PAYMENT_REQUEST",
            sandbox.settings,
            transaction_id=tx,
            content=[customer_xml(), basket, payment_xml("37.50")],
        ),
    )
    assert outcome(pr.content)[2] == 402
    return tx


def deliver_one(sandbox: RunningSandbox, tx: str) -> bytes:
    return request_xml(
        "CONFIRMATION_DELIVER",
        sandbox.settings,
        transaction_id=tx,
        content=[basket_xml([("SKU-100", 1, "12.50")])],
    )


def test_timeout_after_booking_books_then_never_answers(sandbox) -> None:
    tx = authorised(sandbox)
    sandbox.gateway.faults.add(
        Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER", delay_s=1.0)
    )
    with pytest.raises(requests.ReadTimeout):
        post(sandbox, deliver_one(sandbox, tx), timeout=0.3)
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 1
    shipped = sandbox.status(tx).json()["basket"]["current_items"][0]["shop_items"]
    assert [(i["identification_number"], i["quantity"]) for i in shipped["shipped_items"]] == [
        ("SKU-100", 1)
    ]
    assert sandbox.gateway.received[-1].fault == "timeout_after_booking"
    assert sandbox.gateway.received[-1].http_status is None


def test_timeout_after_booking_without_delay_closes_the_connection(sandbox) -> None:
    tx = authorised(sandbox)
    sandbox.gateway.faults.add(Fault("timeout_after_booking"))
    with pytest.raises(requests.ConnectionError):
        post(sandbox, deliver_one(sandbox, tx))
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 1


def test_drop_closes_before_booking(sandbox) -> None:
    tx = authorised(sandbox)
    sandbox.gateway.faults.add(Fault("drop", operation="CONFIRMATION_DELIVER"))
    with pytest.raises(requests.ConnectionError):
        post(sandbox, deliver_one(sandbox, tx))
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 0


def test_http_500_books_nothing(sandbox) -> None:
    tx = authorised(sandbox)
    sandbox.gateway.faults.add(Fault("http_500", operation="CONFIRMATION_DELIVER", times=1))
    assert post(sandbox, deliver_one(sandbox, tx)).status_code == 500
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 0
    # times=1: the next call goes through
    assert outcome(post(sandbox, deliver_one(sandbox, tx)).content) == ("OK", 303, 404)


def test_malformed_xml_books_and_answers_garbage(sandbox) -> None:
    tx = authorised(sandbox)
    sandbox.gateway.faults.add(Fault("malformed_xml", operation="CONFIRMATION_DELIVER"))
    response = post(sandbox, deliver_one(sandbox, tx))
    assert response.status_code == 200
    with pytest.raises(etree.XMLSyntaxError):
        etree.fromstring(response.content)
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 1


def test_result_code_answers_error_without_booking(sandbox) -> None:
    tx = authorised(sandbox)
    sandbox.gateway.faults.add(
        Fault("result_code", operation="PAYMENT_CHANGE", subtype="cancellation", result_code=150)
    )
    cancel = request_xml(
        "PAYMENT_CHANGE",
        sandbox.settings,
        transaction_id=tx,
        subtype="cancellation",
        content=[basket_xml([("SKU-100", 1, "12.50")])],
    )
    assert outcome(post(sandbox, cancel).content) == ("ERROR", 1000, 150)
    assert sandbox.gateway.ledger(tx)["SKU-100"].cancelled == 0
    # the subtype filter: a delivery is not affected
    assert outcome(post(sandbox, deliver_one(sandbox, tx)).content)[2] == 404


def processing(content: bytes) -> dict[str, str | None]:
    p = parse_xml(content).find("r:head/r:processing", NS)
    return {etree.QName(el).localname: el.get("code") for el in p}


def test_status_fatal_answers_without_a_result_and_books_nothing(sandbox) -> None:
    tx = authorised(sandbox)
    sandbox.gateway.faults.add(Fault("status_fatal", operation="CONFIRMATION_DELIVER"))
    response = post(sandbox, deliver_one(sandbox, tx))
    assert response.status_code == 200
    assert processing(response.content) == {"timestamp": None, "status": "FATAL", "reason": "1000"}
    root = parse_xml(response.content)
    assert root.findtext("r:head/r:response-type", namespaces=NS) == "STATUS_ERROR"
    assert root.findtext("r:head/r:transaction-id", namespaces=NS) == tx
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 0
    assert sandbox.gateway.received[-1].fault == "status_fatal"


@pytest.mark.parametrize(
    ("fault", "expected", "response_type"),
    [
        (Fault("status_warning"), ("WARNING", 303, 404), "STATUS_RESPONSE"),
        (Fault("status_warning", result_code=150), ("WARNING", 303, 150), "STATUS_RESPONSE"),
        (Fault("result_warning"), ("OK", 303, 405), "STATUS_RESPONSE"),
        (
            Fault("status_fatal", result_code=150, reason_code=101),
            ("FATAL", 101, 150),
            "STATUS_ERROR",
        ),
    ],
)
def test_status_and_result_faults_answer_success_shaped_and_book_nothing(
    sandbox, fault: Fault, expected: tuple[str, int, int], response_type: str
) -> None:
    tx = authorised(sandbox)
    fault.operation = "CONFIRMATION_DELIVER"
    sandbox.gateway.faults.add(fault)
    response = post(sandbox, deliver_one(sandbox, tx))
    assert outcome(response.content) == expected
    root = parse_xml(response.content)
    assert root.findtext("r:head/r:response-type", namespaces=NS) == response_type
    assert sandbox.gateway.ledger(tx)["SKU-100"].delivered == 0
    assert not sandbox.gateway.received[-1].booked


def test_delay_answers_late_but_normally(sandbox) -> None:
    sandbox.gateway.faults.add(Fault("delay", operation="PAYMENT_INIT", delay_s=0.3))
    started = time.monotonic()
    response = post(sandbox, request_xml("PAYMENT_INIT", sandbox.settings))
    assert time.monotonic() - started >= 0.3
    assert outcome(response.content) == ("OK", 300, 350)


def test_call_number_hits_only_that_call(sandbox) -> None:
    sandbox.gateway.faults.add(Fault("http_500", operation="PAYMENT_INIT", call_number=2))
    codes = [
        post(sandbox, request_xml("PAYMENT_INIT", sandbox.settings)).status_code for _ in range(3)
    ]
    assert codes == [200, 500, 200]


def test_probability_is_reproducible_with_a_seed() -> None:
    def run() -> list[bool]:
        faults = FaultSet(seed=42)
        faults.add(Fault("http_500", probability=0.5))
        return [faults.pick("PAYMENT_INIT", None) is not None for _ in range(40)]

    first = run()
    assert first == run()
    assert 5 < sum(first) < 35


def test_every_n_and_spec_parsing() -> None:
    fault = Fault.parse("http_500:PAYMENT_CHANGE/return:3")
    assert (fault.operation, fault.subtype, fault.every) == ("PAYMENT_CHANGE", "return", 3)
    assert Fault.parse("drop:*:0.25").probability == 0.25
    assert Fault.parse("result_code=405:PAYMENT_CHANGE").result_code == 405
    faults = FaultSet()
    faults.add(fault)
    hits = [faults.pick("PAYMENT_CHANGE", "return") is not None for _ in range(6)]
    assert hits == [False, False, True, False, False, True]
    assert faults.pick("PAYMENT_CHANGE", "cancellation") is None
    with pytest.raises(FaultSpecError):
        Fault.parse("explode:PAYMENT_INIT")
    fatal = Fault.parse("status_fatal:CONFIRMATION_DELIVER")
    assert (fatal.kind, fatal.operation, fatal.result_code) == (
        "status_fatal",
        "CONFIRMATION_DELIVER",
        None,
    )
    warning = Fault.parse("status_warning=150:PAYMENT_CHANGE/return:2")
    assert (warning.kind, warning.result_code, warning.subtype, warning.every) == (
        "status_warning",
        150,
        "return",
        2,
    )
    assert Fault.parse("result_warning:*:0.5").probability == 0.5
    with pytest.raises(FaultSpecError):
        Fault.parse("drop:PAYMENT_INIT:often")


def test_faults_settable_at_run_time(sandbox) -> None:
    created = requests.post(
        sandbox.faults_url, json={"kind": "http_500", "operation": "PAYMENT_INIT"}, timeout=5
    )
    assert created.status_code == 201 and created.json()[0]["kind"] == "http_500"
    assert post(sandbox, request_xml("PAYMENT_INIT", sandbox.settings)).status_code == 500
    assert requests.get(sandbox.faults_url, timeout=5).json()[0]["applied"] == 1
    assert requests.delete(sandbox.faults_url, timeout=5).status_code == 200
    assert post(sandbox, request_xml("PAYMENT_INIT", sandbox.settings)).status_code == 200
    for kind, status in (("status_fatal", "FATAL"), ("status_warning", "WARNING")):
        requests.post(
            sandbox.faults_url,
            json={"kind": kind, "operation": "PAYMENT_INIT", "times": 1},
            timeout=5,
        ).raise_for_status()
        answer = post(sandbox, request_xml("PAYMENT_INIT", sandbox.settings))
        assert processing(answer.content)["status"] == status
        requests.delete(sandbox.faults_url, timeout=5).raise_for_status()
    bad = requests.post(sandbox.faults_url, json={"kind": "nope"}, timeout=5)
    assert bad.status_code == 400 and "unknown fault kind" in bad.json()["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_sandbox_serve_answers_and_stops_on_sigint() -> None:
    port = _free_port()
    code = "0123456789abcdef0123456789abcdef"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from ratepay_oms.cli import main; sys.exit(main())",
            "sandbox",
            "serve",
            "--port",
            str(port),
            "--security-code",
            code,
            "--fault",
            "http_500:PAYMENT_CHANGE:0.5",
            "--fault",
            "status_warning:PROFILE_REQUEST",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        first = proc.stdout.readline().decode()
        assert f"http://127.0.0.1:{port}/api/xml/1_0" in first
        settings = {"PROFILE_ID": "INTEGRATION_TE_DACH", "SECURITY_CODE": code}
        response = requests.post(
            f"http://127.0.0.1:{port}/api/xml/1_0",
            data=request_xml("PAYMENT_INIT", settings),
            timeout=5,
        )
        assert outcome(response.content) == ("OK", 300, 350)
        profile = requests.post(
            f"http://127.0.0.1:{port}/api/xml/1_0",
            data=request_xml("PROFILE_REQUEST", settings),
            timeout=5,
        )
        assert outcome(profile.content) == ("WARNING", 306, 500)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130)
    assert code not in first + out.decode() + err.decode()
