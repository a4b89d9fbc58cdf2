"""Two tick processes at once on a server database never run a command twice for an item.

Real subprocesses (not threads): each builds its own Engine with the test plugins loaded from
``$RATEPAY_OMS_PLUGINS`` and ticks in small batches while the by-order command sleeps a little,
so the two workers race for the same orders the whole time. The command writes one row per
item in the same transaction as the state change, so a row exists exactly when a run committed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

from ratepay_oms import Engine
from tests.plugins_for_tests import (
    PROCESS_DIR,
    command_runs,
    make_registry,
    order_doc,
    prepare_database,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ORDERS = 24
UNITS_PER_ORDER = 2

WORKER = """
import json, sys
from ratepay_oms import Engine
engine = Engine(sys.argv[1], process_dir=sys.argv[2], worker_id=sys.argv[3], batch_size=3)
print(json.dumps(engine.tick().to_json()))
"""


def test_two_tick_processes_never_run_a_command_twice_for_an_item(
    server_only_db_url: str,
) -> None:
    """Server dialects only: SQLite runs one tick worker at a time (no row locks), and
    refuses a second one (tests/test_reliability_workers.py)."""
    prepare_database(server_only_db_url)
    engine = Engine(server_only_db_url, process_dir=PROCESS_DIR, registry=make_registry())
    refs = [f"C-{uuid.uuid4().hex[:8]}-{n}" for n in range(ORDERS)]
    item_ids: list[int] = []
    for r in refs:
        view = engine.place_order(
            order_doc(r, process="EngineWork01", lines=(("SKU-A", UNITS_PER_ORDER),)), fire=False
        )
        item_ids.extend(i.id for i in view.items)

    env = {
        **os.environ,
        "RATEPAY_OMS_PLUGINS": "tests.plugins_for_tests:register",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "RATEPAY_OMS_TEST_SLEEP": "0.05",
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, server_only_db_url, str(PROCESS_DIR), f"worker-{n}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    results = []
    for proc in workers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    runs = [r for r in command_runs(server_only_db_url) if r["command"] == "Test/RecordByOrder"]
    per_item = Counter(r["item_id"] for r in runs)
    assert sorted(per_item) == sorted(item_ids)  # every item ran ...
    assert set(per_item.values()) == {1}  # ... exactly once
    calls_per_order = Counter(r["order_ref"] for r in {r["call_id"]: r for r in runs}.values())
    assert set(calls_per_order.values()) == {1}  # a by-order command was never split
    assert len({r["pid"] for r in runs}) == 2  # both workers really competed
    assert sum(r["items_moved"] for r in results) == len(item_ids)
    assert sum(r["errors"] for r in results) == 0, [r["error_messages"] for r in results]
    for r in refs:
        assert engine.order(r).states() == {"done": UNITS_PER_ORDER}
    engine.close()
