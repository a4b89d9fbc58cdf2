"""Goodwill credits and debits through the engine, over real HTTP against the sandbox, on every
database: refused before a delivery and above what RatePAY allows (nothing sent), booked
exactly once in the sandbox's ledger, visible in ``order show``; a lost answer is reconciled,
never sent twice."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal as D

import pytest

from ratepay_oms.cli import main
from ratepay_oms.console.inspect import order_detail
from ratepay_oms.demo import demo_engine, example_order
from ratepay_oms.plugins.ratepay.adjustments import AdjustmentError
from ratepay_oms.sandbox.faults import Fault


@pytest.fixture
def engine(sandbox, server_db_url) -> Iterator:
    eng = demo_engine(server_db_url, sandbox.settings)
    yield eng
    eng.close()


def _shipped(engine, n: int | None = None) -> str:
    ref = f"A-{uuid.uuid4().hex[:8]}"
    ids = [i.id for i in engine.place_order(example_order(ref)).items]
    engine.trigger("ship", ref, ids[:n] if n else ids)
    return ref


def _tx(sandbox, ref):
    return next(t for t in sandbox.gateway.transactions.values() if t.order_id == ref)


def _credits_sent(sandbox) -> int:
    return sum(1 for e in sandbox.gateway.received if e.subtype == "credit")


def test_a_credit_before_any_delivery_is_refused_without_a_call(engine, sandbox):
    ref = f"A-{uuid.uuid4().hex[:8]}"
    engine.place_order(example_order(ref))
    with pytest.raises(AdjustmentError, match="only after a delivery"):
        engine.credit(ref, D("5.00"))
    assert _credits_sent(sandbox) == 0
    assert order_detail(engine, ref)["adjustments"] == []


def test_a_goodwill_credit_is_booked_once_and_shown(engine, sandbox):
    ref = _shipped(engine, 2)  # 2 mugs + shipping: 29.95 invoiced
    result = engine.credit(ref, D("7.50"), reason="late delivery")
    assert result.booked, result.describe()
    tx = _tx(sandbox, ref)
    assert (tx.credited, tx.invoiced) == (D("-7.50"), D("22.45"))
    assert _credits_sent(sandbox) == 1
    detail = order_detail(engine, ref)
    assert detail["amounts"]["credited"] == "7.50"
    (row,) = detail["adjustments"]
    assert (row["kind"], row["amount"], row["status"], row["reason"], row["tax_rate"]) == (
        "credit", "7.50", "booked", "late delivery", "19.00")
    assert row["result_code"] == "403"


def test_a_credit_above_the_balance_and_a_debit_above_the_authorised_amount_are_refused(
    engine, sandbox
):
    ref = _shipped(engine, 2)  # 29.95 invoiced of 82.45 authorised
    with pytest.raises(AdjustmentError, match=r"exceeds what the shopper owes \(29\.95\)"):
        engine.credit(ref, D("30.00"))
    with pytest.raises(AdjustmentError, match=r"at most 52\.50"):
        engine.debit(ref, D("52.51"))
    assert _credits_sent(sandbox) == 0
    assert engine.debit(ref, D("2.50"), tax_rate=D("7"), reason="express").booked
    tx = _tx(sandbox, ref)
    assert (tx.credited, tx.invoiced) == (D("2.50"), D("32.45"))
    assert order_detail(engine, ref)["amounts"]["debited"] == "2.50"


def test_a_refusal_by_ratepay_is_recorded_not_retried(engine, sandbox):
    ref = _shipped(engine, 1)
    sandbox.gateway.add_fault(Fault(kind="result_code", operation="PAYMENT_CHANGE",
                                    subtype="credit", result_code=150, reason_code=2300,
                                    times=1))
    result = engine.credit(ref, D("1.00"))
    assert not result.booked and result.status == "refused"
    (row,) = order_detail(engine, ref)["adjustments"]
    assert (row["status"], row["reason_code"]) == ("refused", "2300")
    assert engine.credit(ref, D("1.00")).booked  # asking again books it once
    assert _tx(sandbox, ref).credited == D("-1.00")


def test_a_lost_answer_waits_for_a_person_and_is_never_sent_twice(engine, sandbox):
    """RatePAY's status API documents no credit figure: the engine does not guess; a person
    checks and resolves the intent, and the credit is booked once."""
    ref = _shipped(engine, 2)
    sandbox.gateway.add_fault(Fault(kind="timeout_after_booking", operation="PAYMENT_CHANGE",
                                    subtype="credit", times=1, delay_s=0.0))
    result = engine.credit(ref, D("4.00"))
    assert result.status == "pending"
    assert _tx(sandbox, ref).credited == D("-4.00")  # the gateway did book it
    engine.tick()
    (intent,) = [i for i in engine.intents(ref) if i.command == "Ratepay/Credit"]
    engine.resolve_intent(intent.id, booked=True, note="credit visible in the portal")
    (row,) = order_detail(engine, ref)["adjustments"]
    assert row["status"] == "booked"
    assert _credits_sent(sandbox) == 1
    assert _tx(sandbox, ref).credited == D("-4.00")
    with pytest.raises(AdjustmentError, match="exceeds"):
        engine.credit(ref, D("26.00"))  # 29.95 − 4.00 left


def test_the_console_books_a_credit_and_refuses_a_bad_one(engine, sandbox, capsys,
                                                          monkeypatch):
    for key, value in sandbox.settings.items():
        monkeypatch.setenv(f"RATEPAY_{key}", value)
    ref = _shipped(engine, 2)
    capsys.readouterr()
    code = main(["credit", ref, "--amount", "5.00", "--reason", "scratched mug",
                 "--db", engine.database_url, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["status"] == "booked"
    code = main(["debit", ref, "--amount", "999.00", "--db", engine.database_url])
    out, err = capsys.readouterr()
    assert code != 0 and out == "" and "at most" in err and "Traceback" not in err
    code = main(["credit", ref, "--amount", "-1", "--db", engine.database_url])
    assert code != 0
    capsys.readouterr()
    assert main(["order", "history", ref, "--db", engine.database_url]) == 0
    assert "credit 5.00 EUR (scratched mug): booked" in capsys.readouterr().out
    assert _tx(sandbox, ref).credited == D("-5.00")
    for text in capsys.readouterr():
        assert sandbox.settings["SECURITY_CODE"] not in text
