"""Commands and conditions the engine tests run (registered by ``register``).

Every command records what it was called with in a table of its own (``test_command_run``),
written through ``ctx.session``: a row exists exactly when the command's transaction committed,
which is what "a command ran once" means to the outside world. Subprocesses load them with
``RATEPAY_OMS_PLUGINS=tests.plugins_for_tests:register``.

Knobs come from ``ctx.services`` (in-process tests) or the environment (subprocesses):
``sleep`` / ``$RATEPAY_OMS_TEST_SLEEP`` seconds per by-order call, ``flaky`` (a dict with
``failures``: how many more calls of Test/Flaky raise), ``flagged`` and ``cleared`` (sets of
SKUs for the conditions).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, delete, insert, select

from ratepay_oms.engine.plugins import (
    ByItemCommand,
    ByOrderCommand,
    CommandContext,
    PluginRegistry,
)
from ratepay_oms.persistence.db import create_db_engine, upgrade
from ratepay_oms.persistence.models import (
    EventTimeout,
    Order,
    OrderItem,
    StateHistory,
    TransitionLog,
)

metadata = MetaData()

command_run = Table(
    "test_command_run",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("order_ref", String(100), nullable=False),
    Column("item_id", Integer, nullable=False),
    Column("command", String(100), nullable=False),
    Column("event", String(100)),
    Column("call_id", String(100), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
)


def _record(ctx: CommandContext, order: Order, items: Sequence[OrderItem], command: str) -> None:
    call_id = f"{os.getpid()}-{time.monotonic_ns()}"
    ctx.session.execute(
        insert(command_run),
        [
            {
                "order_ref": order.order_ref,
                "item_id": item.id,
                "command": command,
                "event": ctx.event,
                "call_id": call_id,
                "pid": os.getpid(),
                "created_at": datetime.now(),
            }
            for item in items
        ],
    )


class RecordByOrder(ByOrderCommand):

    def run(self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]) -> None:
        pause = ctx.services.get("sleep", float(os.environ.get("RATEPAY_OMS_TEST_SLEEP", "0")))
        if pause:
            time.sleep(pause)
        _record(ctx, order, items, "Test/RecordByOrder")


class RecordByItem(ByItemCommand):

    def run_item(self, ctx: CommandContext, order: Order, item: OrderItem) -> None:
        _record(ctx, order, [item], "Test/RecordByItem")


class Flaky(ByOrderCommand):
    """Raises while ``services["flaky"]["failures"]`` is positive (counting down)."""

    def run(self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]) -> None:
        knob = ctx.services.setdefault("flaky", {"failures": 0})
        if knob["failures"] > 0:
            knob["failures"] -= 1
            raise ConnectionError("gateway unreachable (test)")
        _record(ctx, order, items, "Test/Flaky")


class WriteThenFail(ByOrderCommand):
    """Writes its record, then raises: the record must be rolled back with the command."""

    def run(self, ctx: CommandContext, order: Order, items: Sequence[OrderItem]) -> None:
        _record(ctx, order, items, "Test/WriteThenFail")
        ctx.session.flush()
        raise RuntimeError("failed after writing (test)")


def is_flagged(ctx: CommandContext, order: Order, item: OrderItem) -> bool:
    return item.sku in ctx.services.get("flagged", ())


def is_cleared(ctx: CommandContext, order: Order, item: OrderItem) -> bool:
    return item.sku in ctx.services.get("cleared", ())


def register(registry: PluginRegistry) -> None:
    registry.register_by_order("Test/RecordByOrder", RecordByOrder())
    registry.register_by_item("Test/RecordByItem", RecordByItem())
    registry.register_by_order("Test/Flaky", Flaky())
    registry.register_by_order("Test/WriteThenFail", WriteThenFail())
    registry.register_condition("Test/IsFlagged", is_flagged)
    registry.register_condition("Test/IsCleared", is_cleared)


# -- helpers shared by the engine tests (kept here: conftest.py belongs to the lead) ---------

TEST_PROCESSES = ("EngineFlow01", "EngineFlaky01", "EngineLoop01", "EngineWork01", "EngineCode01")
PROCESS_DIR = Path(__file__).parent / "processes" / "engine"
_EXAMPLE = Path(__file__).parent / "data" / "order-invoice.json"


def make_registry() -> PluginRegistry:
    registry = PluginRegistry()
    register(registry)
    return registry


def order_doc(
    ref: str,
    process: str = "EngineFlow01",
    lines: Sequence[tuple[str, int]] = (("SKU-A", 2), ("SKU-B", 1)),
) -> dict[str, Any]:
    """A valid order document (the example invoice) with our ref, process and lines."""
    doc = json.loads(_EXAMPLE.read_text(encoding="utf-8"))
    doc["order_ref"] = ref
    doc["process"] = process
    doc["items"] = [
        {
            "sku": sku,
            "name": f"Item {sku}",
            "quantity": qty,
            "unit_price_gross": "10.00",
            "tax_rate": "19",
        }
        for sku, qty in lines
    ]
    return doc


def prepare_database(url: str) -> None:
    """Schema at head, our table present, and no rows of the test processes left over from
    earlier tests of this session (other rooms' rows are left alone)."""
    upgrade(url)
    engine = create_db_engine(url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(delete(command_run))
            mine = select(OrderItem.id).where(OrderItem.process.in_(TEST_PROCESSES))
            mine_ids = [row[0] for row in conn.execute(mine)]
            for start in range(0, len(mine_ids), 500):
                part = mine_ids[start : start + 500]
                for table in (EventTimeout, TransitionLog, StateHistory):
                    conn.execute(delete(table).where(table.item_id.in_(part)))
                conn.execute(delete(OrderItem).where(OrderItem.id.in_(part)))
            conn.execute(delete(Order).where(Order.process.in_(TEST_PROCESSES)))
    finally:
        engine.dispose()


def command_runs(url: str) -> list[dict[str, Any]]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(command_run).order_by(command_run.c.id))
            return [dict(r._mapping) for r in rows]
    finally:
        engine.dispose()
