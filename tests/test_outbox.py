"""State-change notifications: the outbox row commits with the move, delivery is signed,
retried with backoff, dead-lettered, ordered per order, and survives a worker killed with
SIGKILL in the middle of a POST (at least once, none lost). The receiver is a real HTTP server
on loopback (``tests/notify_receiver.py``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from ratepay_oms import Engine
from ratepay_oms.cli import main
from ratepay_oms.engine.clock import wall_now
from ratepay_oms.engine.outbox import (
    NotificationSettings,
    NotificationSettingsError,
    Outbox,
    OutboxError,
    sign,
    verify_signature,
)
from ratepay_oms.persistence.db import create_db_engine
from ratepay_oms.persistence.models import OutboxEntry
from ratepay_oms.process.errors import ProcessDefinitionError
from ratepay_oms.process.loader import load_processes
from tests.notify_receiver import Receiver
from tests.plugins_for_tests import make_registry, order_doc, prepare_database

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec-test-9d2f1c"

PROCESS = """
process: Notify01
states:
  new:
  accepted: {notify: true}
  exploded: {notify: true}
  shipped: {notify: true}
  closed: {notify: true}
transitions:
  - {source: new, target: accepted, event: accept}
  - {source: accepted, target: exploded, event: explode}
  - {source: accepted, target: shipped, event: ship}
  - {source: shipped, target: closed}
events:
  accept: {on_enter: true}
  explode: {manual: true, command: Test/WriteThenFail}
  ship: {manual: true}
"""


@pytest.fixture(autouse=True)
def _cli_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The console loads the test commands the process names, as a subprocess would."""
    monkeypatch.setenv("RATEPAY_OMS_PLUGINS", "tests.plugins_for_tests:register")


@pytest.fixture
def pdir(tmp_path: Path) -> Path:
    d = tmp_path / "processes"
    d.mkdir()
    (d / "Notify01.yaml").write_text(PROCESS, encoding="utf-8")
    return d


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET)
    try:
        yield r
    finally:
        r.close()


def _engine(url: str, pdir: Path, receiver: Receiver | None = None, **knobs: object) -> Engine:
    prepare_database(url)
    settings = (
        NotificationSettings(url=receiver.url, secret=SECRET, **knobs)  # type: ignore[arg-type]
        if receiver is not None
        else NotificationSettings()
    )
    return Engine(url, process_dir=pdir, registry=make_registry(), notifications=settings)


def _place(engine: Engine, items: int = 2) -> tuple[str, list[int]]:
    ref = f"N-{uuid.uuid4().hex[:8]}"
    view = engine.place_order(order_doc(ref, process="Notify01", lines=(("SKU-A", items),)))
    return ref, [i.id for i in view.items]


def _rows(url: str) -> list[OutboxEntry]:
    db = create_db_engine(url)
    try:
        with sa.orm.Session(db) as session:
            return list(session.scalars(sa.select(OutboxEntry).order_by(OutboxEntry.id)))
    finally:
        db.dispose()


def test_the_notify_key_is_read_and_checked(pdir: Path, tmp_path: Path) -> None:
    definition = load_processes(pdir, make_registry())["Notify01"]
    assert [s for s in definition.states if definition.notifies(s)] == [
        "accepted", "exploded", "shipped", "closed"
    ]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "Bad01.yaml").write_text(
        PROCESS.replace("Notify01", "Bad01").replace("notify: true}", "notify: sometimes}", 1)
    )
    with pytest.raises(ProcessDefinitionError, match="notify"):
        load_processes(bad, make_registry())


def test_a_move_into_a_notify_state_writes_its_row_in_the_same_transaction(
    fresh_db_url: str, pdir: Path
) -> None:
    engine = _engine(fresh_db_url, pdir)
    ref, items = _place(engine)  # new → accepted at once (on-enter): two rows
    rows = _rows(fresh_db_url)
    assert [(r.item_id, r.from_state, r.to_state, r.event, r.status) for r in rows] == [
        (items[0], "new", "accepted", "accept", "pending"),
        (items[1], "new", "accepted", "accept", "pending"),
    ]
    # A command that fails rolls its transaction back: no move, so no notification either.
    result = engine.trigger("explode", ref)
    assert result.errors and len(_rows(fresh_db_url)) == 2
    assert {i.state for i in engine.order(ref).items} == {"accepted"}
    # A manual event, then the tick's event-less move (the set-based path): one row each.
    engine.trigger("ship", ref, [items[0]])
    engine.tick()
    moves = [(r.item_id, r.to_state, r.event) for r in _rows(fresh_db_url)[2:]]
    assert moves == [(items[0], "shipped", "ship"), (items[0], "closed", None)]
    # With notify for every state, the initial state notifies too (from: none).
    every = Engine(fresh_db_url, process_dir=pdir, registry=make_registry(),
                   notifications=NotificationSettings(all_states=True))
    _ref2, items2 = _place(every, items=1)
    assert [(r.from_state, r.to_state) for r in _rows(fresh_db_url) if r.item_id == items2[0]] \
        == [(None, "new"), ("new", "accepted")]


def test_the_tick_delivers_signed_notifications_once_each(
    fresh_db_url: str, pdir: Path, receiver: Receiver
) -> None:
    engine = _engine(fresh_db_url, pdir, receiver)
    ref, items = _place(engine)
    result = engine.tick()
    assert result.notifications_delivered == 2
    assert len(receiver.received) == 2
    for got, item in zip(receiver.received, items, strict=True):
        assert got.signature_ok
        assert got.headers["Idempotency-Key"] == got.body["idempotency_key"] == got.key
        assert {k: v for k, v in got.body.items() if k not in ("idempotency_key", "at")} == {
            "order": ref, "item": item, "process": "Notify01",
            "from": "new", "to": "accepted", "event": "accept",
        }
        assert got.body["at"].endswith("Z")
        datetime.fromisoformat(got.body["at"].removesuffix("Z"))
    assert len(receiver.keys()) == 2
    assert {r.status for r in _rows(fresh_db_url)} == {"delivered"}
    assert engine.tick().notifications_delivered == 0
    assert len(receiver.received) == 2
    # The signature covers the body: one changed byte and it no longer verifies.
    got = receiver.received[0]
    assert not verify_signature(SECRET, got.raw.replace(b"accepted", b"cancelled"), got.headers)
    assert not verify_signature("another-secret", got.raw, got.headers)


def test_a_failing_receiver_gets_retries_with_backoff_then_the_row_is_dead_until_retried(
    fresh_db_url: str, pdir: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine(fresh_db_url, pdir, receiver, max_attempts=2, backoff_s=60.0)
    _place(engine, items=1)
    receiver.fail(2, status=503)
    before = wall_now()
    first = engine.deliver_notifications()
    assert (first.failed, first.dead, first.delivered) == (1, 0, 0)
    (row,) = _rows(fresh_db_url)
    assert row.status == "pending" and row.attempts == 1 and row.last_http_status == 503
    assert row.last_error == "attempt 1: HTTP 503"
    assert before + timedelta(seconds=60) <= row.next_attempt_at
    assert row.next_attempt_at <= wall_now() + timedelta(seconds=66)
    assert engine.deliver_notifications().attempted == 0  # not due yet
    second = engine.deliver_notifications(now=wall_now() + timedelta(minutes=2))
    assert (second.failed, second.dead) == (0, 1)
    (row,) = _rows(fresh_db_url)
    assert row.status == "dead" and row.attempts == 2
    assert engine.deliver_notifications(now=wall_now() + timedelta(days=1)).attempted == 0

    url = fresh_db_url
    assert main(["outbox", "list", "--db", url, "--processes", str(pdir), "--status", "dead",
                 "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["id"], x["status"], x["attempts"]) for x in listed] == [(row.id, "dead", 2)]
    with pytest.raises(OutboxError, match="name the notifications"):
        Outbox(engine.session).retry()
    assert main(["outbox", "retry", "--db", url, "--processes", str(pdir), "--all-dead"]) == 0
    assert "1 notification due again" in capsys.readouterr().out
    assert engine.deliver_notifications().delivered == 1
    keys = [r.key for r in receiver.received]
    assert len(keys) == 3 and len(set(keys)) == 1  # the same key every time: de-duplicable
    assert main(["outbox", "retry", "--db", url, "--processes", str(pdir), str(row.id)]) == 1
    assert "delivered already" in capsys.readouterr().err


def test_a_failed_notification_holds_back_the_later_ones_of_its_order(
    fresh_db_url: str, pdir: Path, receiver: Receiver
) -> None:
    engine = _engine(fresh_db_url, pdir, receiver, backoff_s=1.0)
    ref, _ = _place(engine, items=1)
    other, _ = _place(engine, items=1)
    engine.trigger("ship", ref)  # a second notification of the same order
    receiver.fail(1)
    result = engine.deliver_notifications()
    # ref's first failed, its second waits; the other order is not held back.
    assert (result.failed, result.delivered) == (1, 1)
    assert [(r.body["order"], r.body["to"]) for r in receiver.received] == [
        (ref, "accepted"), (other, "accepted")
    ]
    later = engine.deliver_notifications(now=wall_now() + timedelta(seconds=10))
    assert later.delivered == 2
    assert [r.body["to"] for r in receiver.received if r.body["order"] == ref] == [
        "accepted", "accepted", "shipped"
    ]


def test_purge_drops_old_delivered_rows_and_never_pending_ones(
    fresh_db_url: str, pdir: Path, receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = _engine(fresh_db_url, pdir, receiver)
    _place(engine, items=1)
    engine.deliver_notifications()
    _place(engine, items=1)  # stays pending
    args = ["--db", fresh_db_url, "--processes", str(pdir)]
    assert main(["outbox", "purge", *args, "--older-than", "1h"]) == 0
    assert "0 delivered notifications deleted" in capsys.readouterr().out
    outbox = Outbox(engine.session)
    with pytest.raises(OutboxError, match="never purged"):
        outbox.purge(statuses=("pending",))
    future = wall_now() + timedelta(hours=1)
    assert outbox.purge(older_than=future, dry_run=True) == 1
    assert outbox.purge(older_than=future) == 1
    assert [r.status for r in _rows(fresh_db_url)] == ["pending"]


def test_the_secret_is_never_shown_stored_or_logged(
    fresh_db_url: str, pdir: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    engine = _engine(fresh_db_url, pdir, receiver)
    assert SECRET not in repr(engine.notifications)
    assert "********" in repr(engine.notifications)
    _place(engine, items=1)
    receiver.fail(1, status=500)
    engine.deliver_notifications()
    for args in (["outbox", "list"], ["outbox", "list", "--json"]):
        assert main([*args, "--db", fresh_db_url, "--processes", str(pdir)]) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert SECRET not in caplog.text
    dump = json.dumps([{c.name: str(getattr(r, c.name)) for c in OutboxEntry.__table__.columns}
                       for r in _rows(fresh_db_url)])
    assert SECRET not in dump and "attempt 1: HTTP 500" in dump


def test_notification_settings_from_the_environment_refuse_what_cannot_work() -> None:
    base = {"RATEPAY_OMS_NOTIFY_URL": "https://user:pw@hooks.example/oms"}
    with pytest.raises(NotificationSettingsError, match="SECRET is required"):
        NotificationSettings.from_env(base)
    settings = NotificationSettings.from_env(
        {**base, "RATEPAY_OMS_NOTIFY_SECRET": SECRET, "RATEPAY_OMS_NOTIFY_STATES": "all",
         "RATEPAY_OMS_NOTIFY_MAX_ATTEMPTS": "3"}
    )
    assert settings.all_states and settings.max_attempts == 3
    assert "pw" not in repr(settings) and SECRET not in repr(settings)
    with pytest.raises(NotificationSettingsError, match="'marked'"):
        NotificationSettings.from_env({"RATEPAY_OMS_NOTIFY_STATES": "some"})
    with pytest.raises(NotificationSettingsError, match="http"):
        NotificationSettings.from_env({"RATEPAY_OMS_NOTIFY_URL": "ftp://x",
                                       "RATEPAY_OMS_NOTIFY_SECRET": "s"})
    with pytest.raises(NotificationSettingsError, match="MAX_ATTEMPTS must be a number"):
        NotificationSettings.from_env({"RATEPAY_OMS_NOTIFY_MAX_ATTEMPTS": "ten"})
    assert not NotificationSettings.from_env({}).enabled
    assert sign("k", 1, b"{}") == sign("k", 1, b"{}") != sign("k", 2, b"{}")


# -- a worker killed mid-delivery ---------------------------------------------------------------

CLI = "import sys; from ratepay_oms.cli import main; sys.exit(main())"


def _worker(url: str, pdir: Path, receiver: Receiver) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "RATEPAY_OMS_PLUGINS": "tests.plugins_for_tests:register",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "RATEPAY_OMS_NOTIFY_URL": receiver.url,
        "RATEPAY_OMS_NOTIFY_SECRET": SECRET,
        "RATEPAY_OMS_NOTIFY_LEASE": "2",
        "RATEPAY_OMS_NOTIFY_BATCH": "4",
    }
    return subprocess.Popen(
        [sys.executable, "-c", CLI, "tick", "--loop", "--interval", "0.2", "--json",
         "--db", url, "--processes", str(pdir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_a_worker_killed_mid_delivery_loses_nothing_and_the_next_one_delivers_all(
    fresh_db_url: str, pdir: Path, receiver: Receiver
) -> None:
    engine = _engine(fresh_db_url, pdir)  # no URL here: the rows wait in the outbox
    placed = [_place(engine, items=2) for _ in range(4)]
    expected = {(ref, item) for ref, items in placed for item in items}
    assert len(_rows(fresh_db_url)) == 8

    receiver.hold()  # the first POST arrives, is recorded, and gets no answer
    first = _worker(fresh_db_url, pdir, receiver)
    try:
        assert receiver.arrived.wait(60), first.communicate(timeout=5)[1]
        in_flight = receiver.received[0].key
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    receiver.release()
    rows = _rows(fresh_db_url)
    assert first.returncode == -signal.SIGKILL
    assert not any(r.status == "delivered" for r in rows)  # the answer never got recorded
    (claimed,) = [r for r in rows if r.idempotency_key == in_flight]
    assert claimed.status == "pending" and claimed.claimed_by is not None

    second = _worker(fresh_db_url, pdir, receiver)
    try:
        deadline = time.monotonic() + 90
        while {r.status for r in _rows(fresh_db_url)} != {"delivered"}:
            assert second.poll() is None, second.communicate()[1]
            assert time.monotonic() < deadline, [(r.id, r.status) for r in _rows(fresh_db_url)]
            time.sleep(0.2)
    finally:
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=30)

    rows = _rows(fresh_db_url)
    got = receiver.received
    assert all(r.signature_ok for r in got)
    assert {(r.body["order"], r.body["item"]) for r in got} == expected  # none lost
    assert {r.idempotency_key for r in rows} == receiver.keys()
    assert [r.key for r in got].count(in_flight) >= 2  # sent again: at least once
    # The receiver de-duplicates by key: exactly one notification per move.
    assert len({r.key for r in got}) == len(rows) == 8
