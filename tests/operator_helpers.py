"""Shared by the operator-tool tests (issue 13): the OperatorFlow01 process and a clean slate."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import delete, select

from ratepay_oms import Engine
from ratepay_oms.engine.plugins import CommandContext, PluginRegistry
from ratepay_oms.engine.verdict import Verdict
from ratepay_oms.persistence.conditions import ConditionResult
from ratepay_oms.persistence.db import create_db_engine, upgrade
from ratepay_oms.persistence.models import (
    EventTimeout,
    Intent,
    Order,
    OrderItem,
    StateHistory,
    TransitionLog,
)
from tests.plugins_for_tests import command_run, metadata
from tests.plugins_for_tests import register as register_test_plugins

PROCESS = "OperatorFlow01"
PROCESS_DIR = Path(__file__).parent / "processes" / "operator"


def is_cleared(ctx: CommandContext, order: Order, item: OrderItem) -> Verdict:
    """Holds for SKUs in ``services["cleared"]``; says what it read (for ``explain``)."""
    cleared = sorted(ctx.services.get("cleared", ()))
    return Verdict(item.sku in cleared, {"sku": item.sku, "cleared": cleared})


def register(registry: PluginRegistry) -> None:
    """``RATEPAY_OMS_PLUGINS=tests.operator_helpers:register`` for CLI runs."""
    register_test_plugins(registry)
    registry.register_condition("Operator/IsCleared", is_cleared)


def make_registry() -> PluginRegistry:
    registry = PluginRegistry()
    register(registry)
    return registry


_UPGRADED: set[str] = set()


def clean(url: str) -> None:
    """Schema at head and no rows of OperatorFlow01 left by an earlier test of the session."""
    engine = create_db_engine(url)
    try:
        if url not in _UPGRADED:  # Alembic takes a second a run: once per database
            upgrade(url)
            metadata.create_all(engine)
            _UPGRADED.add(url)
        with engine.begin() as conn:
            conn.execute(delete(command_run))
            mine = select(OrderItem.id).where(OrderItem.process == PROCESS)
            ids = [r[0] for r in conn.execute(mine)]
            orders = [r[0] for r in conn.execute(select(Order.id).where(Order.process == PROCESS))]
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                for table in (ConditionResult, EventTimeout, TransitionLog, StateHistory):
                    conn.execute(delete(table).where(table.item_id.in_(part)))
                conn.execute(delete(OrderItem).where(OrderItem.id.in_(part)))
            for start in range(0, len(orders), 500):
                conn.execute(delete(Intent).where(Intent.order_id.in_(orders[start : start + 500])))
            conn.execute(delete(Order).where(Order.process == PROCESS))
    finally:
        engine.dispose()


@contextmanager
def operator_engine(url: str, **services: object) -> Iterator[Engine]:
    clean(url)
    engine = Engine(
        url,
        process_dir=PROCESS_DIR,
        registry=make_registry(),
        services=dict(services),
        worker_id="operator-test",
    )
    try:
        yield engine
    finally:
        engine.close()


def new_ref() -> str:
    return f"OP-{uuid.uuid4().hex[:10]}"
