"""No network call inside a database transaction: a slow gateway blocks nobody on SQLite.

A ``ratepay-oms tick`` worker (its own process, as in production) works on an order whose
gateway calls the sandbox answers only after 3 s each. While its first call (PAYMENT_INIT) is in
flight (the sandbox has received it and not answered yet), a reader (``order show``), a shop
placing an order without firing it and a person firing a manual event on another order all go
through on the same SQLite file. Before the drive loop, the worker made PAYMENT_INIT inside its
``BEGIN IMMEDIATE`` transaction: the writers then waited for its write lock until the call was
over (or failed with ``database is locked``), which this test sees as their finishing only
after the gateway answered.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from ratepay_oms.demo import demo_engine, example_order
from ratepay_oms.process.loader import default_process_dir
from ratepay_oms.sandbox.faults import Fault

DELAY_S = 3.0


def _tick_worker(url: str, settings: dict[str, str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RATEPAY_")}
    env.update({f"RATEPAY_{key}": value for key, value in settings.items()})
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])
    )
    command = [
        sys.executable, "-c", "import sys; from ratepay_oms.cli import main; sys.exit(main())",
        "tick", "--db", url, "--processes", str(default_process_dir()), "--json",
    ]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_reads_places_and_events_go_through_while_a_tick_call_is_in_flight(
    sandbox, tmp_sqlite_url: str
) -> None:
    url = tmp_sqlite_url
    gateway = sandbox.gateway
    engine = demo_engine(url, sandbox.settings)
    try:
        other = f"OTHER-{uuid.uuid4().hex[:6]}"
        engine.place_order(example_order(other))  # paid at once (no delay yet)
        assert engine.order(other).states() == {"ready for shipment": 4}
        slow = f"SLOW-{uuid.uuid4().hex[:6]}"
        engine.place_order(example_order(slow), fire=False)

        # Every answer takes 3 s; a fault per operation we watch counts its arrivals.
        init = Fault("delay", operation="PAYMENT_INIT", delay_s=DELAY_S)
        deliver = Fault("delay", operation="CONFIRMATION_DELIVER", delay_s=DELAY_S)
        for fault in (init, deliver, Fault("delay", delay_s=DELAY_S)):
            gateway.faults.add(fault)

        def inits() -> int:  # an exchange is recorded once it is answered
            return sum(e.operation == "PAYMENT_INIT" for e in list(gateway.received))

        answered_before = inits()

        def init_answered() -> bool:
            return inits() > answered_before

        worker = _tick_worker(url, sandbox.settings)
        try:
            _wait_until(lambda: init.seen >= 1 or worker.poll() is not None,
                        "the tick's PAYMENT_INIT to reach the gateway")
            assert worker.poll() is None, worker.communicate()
            assert not init_answered()
            # order show
            assert engine.order(slow).states() == {"payment request initialized": 4}
            # order place --no-fire
            placed = engine.place_order(example_order(f"NEW-{uuid.uuid4().hex[:6]}"), fire=False)
            assert placed.states() == {"new": 4}
            assert not init_answered(), "placing an order waited for the tick's gateway call"
            # a manual event on another order: its transaction commits and its own call leaves
            # while the tick's call is still unanswered
            results: list[object] = []
            event = threading.Thread(target=lambda: results.append(engine.trigger("ship", other)))
            event.start()
            _wait_until(lambda: deliver.seen >= 1 or not event.is_alive(),
                        "the event's CONFIRMATION_DELIVER to reach the gateway")
            assert deliver.seen == 1
            assert not init_answered(), "the manual event waited for the tick's gateway call"
            event.join(timeout=60)
            (result,) = results
            assert not result.errors  # type: ignore[attr-defined]
            assert engine.order(other).states() == {"ready for refund": 4}

            out, err = worker.communicate(timeout=120)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        assert worker.returncode == 0, err
        assert "database is locked" not in out + err
        assert engine.order(slow).states() == {"ready for shipment": 4}
        assert not engine.intents(slow)
    finally:
        engine.close()
