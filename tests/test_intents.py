"""Exactly-once bookings: intents committed before the call, settled with the move, reconciled
through the sandbox's transaction status lookup when the answer was lost — never re-sent.

Every test counts the booking calls that reached the gateway and checks the gateway's ledger,
so a blind re-send (a double delivery, a double refund) fails it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select, update

from ratepay_oms.cli import _mount, cli, main
from ratepay_oms.demo import calls_of, demo_engine, example_order
from ratepay_oms.engine.errors import ManualEventError, OrderLockedError
from ratepay_oms.engine.intents import IntentError
from ratepay_oms.persistence.models import Intent, Order
from ratepay_oms.persistence.payment import RatepayItemOutcome
from ratepay_oms.sandbox.faults import Fault

_mount()  # attach the command groups to ``cli`` for CliRunner


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@pytest.fixture
def url(server_db_url: str) -> str:
    return server_db_url


@pytest.fixture
def engine(url, sandbox):
    eng = demo_engine(url, sandbox.settings)
    yield eng
    eng.close()


@pytest.fixture
def blind_engine(url, sandbox):
    """An engine that cannot ask the gateway what it booked (no status lookup URL)."""
    settings = {k: v for k, v in sandbox.settings.items() if not k.startswith("OAUTH_")}
    eng = demo_engine(url, settings)
    yield eng
    eng.close()


def _ready(engine, now):
    ref = f"I-{uuid.uuid4().hex[:8]}"
    engine.place_order(example_order(ref), now=now)
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    return ref


def _states(engine, ref):
    return [i.state for i in engine.order(ref).items]


def _ops(sandbox, ref_tx=None):
    return [(c.operation, c.result) for c in calls_of(sandbox.gateway.received)]


def _ledger(sandbox, ref):
    """The gateway's ledger of the order's transaction now (a snapshot)."""
    tx = next(t for t in sandbox.gateway.transactions.values() if t.order_id == ref)
    return tx, sandbox.gateway.ledger(tx.transaction_id)


def _count(sandbox, operation):
    return sum(1 for c in calls_of(sandbox.gateway.received) if c.operation == operation)


def test_delivery_answer_lost_after_booking_is_reconciled_not_resent(engine, sandbox):
    now = _now()
    ref = _ready(engine, now)
    sandbox.gateway.faults.add(Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER"))
    result = engine.trigger("ship", ref, now=now)
    assert result.errors and "may have been booked" in result.errors[0]
    assert _states(engine, ref) == ["shipped"] * 4
    _, ledger = _ledger(sandbox, ref)
    assert ledger["SKU-100"].delivered == 3  # booked at the gateway, answer lost
    (intent,) = engine.intents(ref)
    assert intent.status == "pending"
    assert intent.summary["positions"]["SKU-100"] == {"before": 0, "add": 3}

    tick = engine.tick(now=now + timedelta(seconds=1))
    assert _states(engine, ref) == ["ready for refund"] * 4
    assert _count(sandbox, "CONFIRMATION_DELIVER") == 1  # never sent twice
    _, ledger = _ledger(sandbox, ref)
    assert ledger["SKU-100"].delivered == 3 and ledger["shipping"].delivered == D("4.95")
    assert engine.intents(ref) == []
    (settled,) = [i for i in engine.intents(ref, open_only=False) if i.command.endswith("Delivery")]
    assert settled.resolution == "reconciled_booked" and "status API" in (settled.note or "")
    assert tick.items_moved >= 4

    # Our ledger agrees: the next step (a refund of one unit) is accepted by the gateway.
    item = engine.order(ref).items[0]
    refunded = engine.trigger("refund payment", ref, [item.id], now=now + timedelta(seconds=2))
    assert not refunded.errors, refunded.errors
    assert _ledger(sandbox, ref)[1]["SKU-100"].returned == 1


def test_refund_with_malformed_answer_after_booking_is_booked_once(engine, sandbox):
    now = _now()
    ref = _ready(engine, now)
    engine.trigger("ship", ref, now=now)
    item = engine.order(ref).items[0]
    sandbox.gateway.faults.add(Fault("malformed_xml", operation="PAYMENT_CHANGE", subtype="return"))
    engine.trigger("refund payment", ref, [item.id], now=now)
    _, ledger = _ledger(sandbox, ref)
    assert ledger["SKU-100"].returned == 1
    assert engine.order(ref).items[0].intent_id is not None

    engine.tick(now=now + timedelta(seconds=1))
    assert engine.order(ref).items[0].state in ("refund succeeded", "completed")
    assert _ledger(sandbox, ref)[1]["SKU-100"].returned == 1
    returns = [c for c in calls_of(sandbox.gateway.received) if c.subtype == "return"]
    assert len(returns) == 1


def test_a_500_that_booked_nothing_is_sent_again_after_the_lookup(engine, sandbox):
    now = _now()
    ref = _ready(engine, now)
    sandbox.gateway.faults.add(Fault("http_500", operation="PAYMENT_CHANGE", times=1))
    item_ids = [i.id for i in engine.order(ref).items][:1]
    engine.trigger("cancel", ref, item_ids, now=now)
    assert engine.order(ref).items[0].intent_id is not None
    # The item waits: a person cannot ship it while its cancellation may be booked.
    with pytest.raises(ManualEventError, match="waits for the outcome of gateway call intent"):
        engine.trigger("ship", ref, item_ids, now=now)

    engine.tick(now=now + timedelta(seconds=1))
    assert engine.order(ref).items[0].state == "cancelled"
    cancels = [c for c in calls_of(sandbox.gateway.received) if c.subtype == "cancellation"]
    assert [c.result for c in cancels] == ["HTTP 500", "403"]
    _, ledger = _ledger(sandbox, ref)
    assert ledger["SKU-100"].cancelled == 1


def test_without_a_status_source_a_person_resolves_it(blind_engine, sandbox, url):
    engine = blind_engine
    now = _now()
    ref = _ready(engine, now)
    sandbox.gateway.faults.add(Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER"))
    engine.trigger("ship", ref, now=now)
    result = engine.tick(now=now + timedelta(seconds=1))
    assert any("outcome unknown" in m for m in result.error_messages)
    (intent,) = engine.intents(ref)
    assert intent.status == "unknown"
    assert f"ratepay-oms intents resolve {intent.id}" in intent.explain()
    assert _states(engine, ref) == ["shipped"] * 4
    engine.tick(now=now + timedelta(hours=2))  # nothing happens on its own
    assert _states(engine, ref) == ["shipped"] * 4
    assert _count(sandbox, "CONFIRMATION_DELIVER") == 1

    env = {"RATEPAY_OMS_DATABASE_URL": url}
    for key, value in sandbox.settings.items():
        if not key.startswith("OAUTH_"):
            env[f"RATEPAY_{key}"] = value
    runner = CliRunner()
    shown = runner.invoke(cli, ["order", "show", ref], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"intent {intent.id} (unknown)" in shown.output and "--booked" in shown.output
    shown_json = runner.invoke(cli, ["order", "show", ref, "--json"], env=env)
    assert json.loads(shown_json.output)["intents"][0]["status"] == "unknown"
    listed = runner.invoke(cli, ["intents", "list", "--json"], env=env)
    assert intent.id in [i["id"] for i in json.loads(listed.output)]
    missing_flag = runner.invoke(cli, ["intents", "resolve", str(intent.id)], env=env)
    assert missing_flag.exit_code != 0 and "--booked or --not-booked" in missing_flag.output

    resolved = runner.invoke(
        cli, ["intents", "resolve", str(intent.id), "--booked", "--note", "seen in the portal"],
        env=env,
    )
    assert resolved.exit_code == 0, resolved.output
    assert _states(engine, ref) == ["ready for refund"] * 4
    assert _count(sandbox, "CONFIRMATION_DELIVER") == 1
    with pytest.raises(IntentError, match="already settled"):
        engine.resolve_intent(intent.id, booked=True)
    (settled,) = [i for i in engine.intents(ref, open_only=False) if i.id == intent.id]
    assert settled.resolution == "resolved_booked" and "seen in the portal" in settled.note


def test_resolving_as_not_booked_sends_it_again(blind_engine, sandbox):
    engine = blind_engine
    now = _now()
    ref = _ready(engine, now)
    sandbox.gateway.faults.add(Fault("http_500", operation="CONFIRMATION_DELIVER", times=1))
    engine.trigger("ship", ref, now=now)
    engine.tick(now=now)
    (intent,) = engine.intents(ref)
    assert intent.status == "unknown"
    engine.resolve_intent(intent.id, booked=False, note="nothing at RatePAY", now=now)
    engine.tick(now=now)
    assert _states(engine, ref) == ["ready for refund"] * 4
    assert [r for op, r in _ops(sandbox) if op == "CONFIRMATION_DELIVER"] == ["HTTP 500", "404"]


def test_an_intent_is_not_settled_while_another_worker_holds_the_order(engine, sandbox, url):
    now = _now()
    ref = _ready(engine, now)
    sandbox.gateway.faults.add(Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER"))
    engine.trigger("ship", ref, now=now)
    db = create_engine(url)
    try:
        with db.begin() as conn:
            conn.execute(
                update(Order).where(Order.order_ref == ref)
                .values(claimed_by="busy-worker", claim_expires_at=datetime(2999, 1, 1))
            )
        engine.tick(now=now)
        assert _states(engine, ref) == ["shipped"] * 4  # its worker may still be at it
        (intent,) = engine.intents(ref)
        with pytest.raises(OrderLockedError, match="busy-worker"):
            engine.resolve_intent(intent.id, booked=True)
        with db.begin() as conn:
            conn.execute(
                update(Order).where(Order.order_ref == ref)
                .values(claim_expires_at=datetime(2000, 1, 1))
            )
    finally:
        db.dispose()
    engine.tick(now=now)
    assert _states(engine, ref) == ["ready for refund"] * 4
    assert _count(sandbox, "CONFIRMATION_DELIVER") == 1


def test_a_worker_killed_after_the_booking_loses_nothing_and_books_once(
    engine, sandbox, url, tmp_path: Path
):
    """A real ``ratepay-oms event ship`` process is SIGKILLed while the gateway has booked the
    delivery and not yet answered; a later tick (after the lease expired) settles it."""
    now = _now()
    ref = _ready(engine, now)
    sandbox.gateway.faults.add(
        Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER", delay_s=30)
    )
    env = dict(os.environ, RATEPAY_OMS_DATABASE_URL=url)
    env.update({f"RATEPAY_{k}": v for k, v in sandbox.settings.items()})
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ratepay_oms.cli import main; sys.exit(main())",
         "event", "ship", ref],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tx = next((t for t in sandbox.gateway.transactions.values() if t.order_id == ref), None)
            if tx is not None and sandbox.gateway.ledger(tx.transaction_id)["SKU-100"].delivered:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the delivery never reached the gateway")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    (intent,) = engine.intents(ref)
    assert intent.status == "pending" and _states(engine, ref) == ["shipped"] * 4

    engine.tick(now=now)  # the dead worker's lease still runs: hands off
    assert _states(engine, ref) == ["shipped"] * 4
    db = create_engine(url)
    try:
        with db.begin() as conn:  # let the lease and the in-flight margin run out, as time would
            conn.execute(
                update(Order).where(Order.order_ref == ref)
                .values(claim_expires_at=datetime(2000, 1, 1))
            )
            assert intent.reconcile_at > datetime.now(UTC).replace(tzinfo=None)
            conn.execute(
                update(Intent).where(Intent.id == intent.id)
                .values(reconcile_at=datetime(2000, 1, 1))
            )
    finally:
        db.dispose()
    engine.tick(now=now)
    assert _states(engine, ref) == ["ready for refund"] * 4
    assert _count(sandbox, "CONFIRMATION_DELIVER") == 1
    with engine.session() as s:
        delivered = s.scalars(
            select(RatepayItemOutcome.item_id).where(
                RatepayItemOutcome.action == "delivery", RatepayItemOutcome.success.is_(True)
            ).join(Order, Order.id == RatepayItemOutcome.order_id).where(Order.order_ref == ref)
        ).all()
        assert len(delivered) == 4 == len(set(delivered))
        assert s.scalar(select(Intent.status).where(Intent.id == intent.id)) == "settled"


def test_payment_request_lost_answer_is_reconciled_from_the_transaction_state(engine, sandbox):
    now = _now()
    sandbox.gateway.faults.add(Fault("timeout_after_booking", operation="PAYMENT_REQUEST"))
    ref = f"I-{uuid.uuid4().hex[:8]}"
    engine.place_order(example_order(ref), now=now)
    assert {i.state for i in engine.order(ref).items} == {"payment request initialized"}
    engine.tick(now=now)
    assert {i.state for i in engine.order(ref).items} == {"ready for shipment"}
    assert _count(sandbox, "PAYMENT_REQUEST") == 1 and _count(sandbox, "PAYMENT_INIT") == 1


def test_cli_intents_list_is_empty_and_resolve_of_unknown_id_is_one_line(url, engine):
    env = {"RATEPAY_OMS_DATABASE_URL": url}
    out = CliRunner().invoke(cli, ["intents", "list"], env=env)
    assert out.exit_code == 0
    code = main(["intents", "resolve", "999999", "--booked", "--db", url])
    assert code != 0


def test_process_migration_refuses_orders_waiting_on_an_intent(blind_engine, sandbox):
    from ratepay_oms.console.migrate import MigrationError, plan_migration

    engine = blind_engine
    now = _now()
    ref = _ready(engine, now)
    sandbox.gateway.faults.add(Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER"))
    engine.trigger("ship", ref, now=now)
    definition = engine.definitions()["RatepayInvoice01"]
    identity = {state: state for state in definition.states}
    with pytest.raises(MigrationError, match=f"outcome is open: .*{ref}"):
        plan_migration(
            engine, {"RatepayInvoice01": definition, "RatepayInvoice99": definition},
            "RatepayInvoice01", "RatepayInvoice99", identity,
        )


def test_an_open_intent_of_a_command_nobody_registers_does_not_stop_the_tick(engine, sandbox, url):
    """A plugin uninstalled (or a command renamed) while its call was open: the tick reports
    the intent with what to do, releases the order, backs off, and does the other work."""
    now = _now()
    lost, other = _ready(engine, now), _ready(engine, now)
    sandbox.gateway.faults.add(Fault("timeout_after_booking", operation="CONFIRMATION_DELIVER"))
    engine.trigger("ship", lost, now=now)
    engine.trigger("ship", other, now=now)
    (orphan,) = engine.intents(lost)
    db = create_engine(url)
    with db.begin() as conn:
        conn.execute(update(Intent).where(Intent.id == orphan.id)
                     .values(command="UninstalledPlugin/Delivery"))
    try:
        _tick_past_the_orphan(engine, sandbox, db, now, lost, other, orphan.id)
    finally:
        # The session's database is shared: later tests' ticks must not meet this intent
        # (they would reconcile it against their own sandbox, or send it again there).
        with db.begin() as conn:
            conn.execute(update(Intent).where(Intent.id == orphan.id)
                         .values(command=orphan.command))
        db.dispose()
        engine.resolve_intent(orphan.id, booked=True, note="test cleanup: it was booked")


def _tick_past_the_orphan(engine, sandbox, db, now, lost, other, orphan_id):
    """The checks of the test above, on its prepared database."""
    result = engine.tick(now=now + timedelta(seconds=1))

    assert _states(engine, other) == ["ready for refund"] * 4  # the other order's work is done
    assert _count(sandbox, "CONFIRMATION_DELIVER") == 2  # neither call sent again
    (message,) = [m for m in result.error_messages if "UninstalledPlugin/Delivery" in m]
    assert f"intent {orphan_id} of order {lost}" in message
    assert f"ratepay-oms intents resolve {orphan_id} --not-booked" in message
    assert result.errors == 1
    with db.connect() as conn:
        row = conn.execute(select(Intent).where(Intent.id == orphan_id)).one()
        order = conn.execute(select(Order).where(Order.order_ref == lost)).one()
    assert row.status == "pending" and "no command plugin" in row.last_error
    assert row.reconcile_at > _now() + timedelta(seconds=20)  # backoff, not every tick
    assert order.claimed_by is None or order.claim_expires_at <= _now()  # not left leased
    assert _states(engine, lost) == ["shipped"] * 4

    again = engine.tick(now=now + timedelta(seconds=2))
    assert again.errors == 0  # not retried before its time
