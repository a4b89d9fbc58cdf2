"""An order is leased exactly while one of its gateway calls is in flight, whether the lease
and its drop are statements of their own or ride on the intent INSERT and the settle's
compare-and-set (PostgreSQL).

Real engine, real sandbox over HTTP, real databases: each call looks at the order's lease from
another connection while it is being sent, and SQLAlchemy's events list what the drive sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from ratepay_oms.demo import demo_engine, example_order
from ratepay_oms.engine.plugins import ExternalCommand
from ratepay_oms.persistence.models import Order

LEASE = "UPDATE oms_order SET claimed_by"


class LeaseSeen(ExternalCommand[Any, Any]):
    """A real command that notes, as its call leaves, who holds its order's lease (read on a
    connection of its own, so only what is committed)."""

    def __init__(self, real: ExternalCommand[Any, Any], db: sa.Engine) -> None:
        self.real = real
        self.db = db
        self.seen: list[tuple[str | None, bool]] = []
        self.order_id: int | None = None

    def plan(self, ctx: Any, order: Any, items: Any) -> Any:
        self.order_id = order.id  # one order per test
        return self.real.plan(ctx, order, items)

    def send(self, call: Any, io: Any) -> Any:
        with self.db.connect() as conn:
            holder, until = conn.execute(
                sa.select(Order.claimed_by, Order.claim_expires_at)
                .where(Order.id == self.order_id)
            ).one()
        now = datetime.now(UTC).replace(tzinfo=None)
        self.seen.append((holder, until is not None and until > now))
        return self.real.send(call, io)

    def apply(self, ctx: Any, order: Any, items: Any, summary: Any, answer: Any) -> None:
        self.real.apply(ctx, order, items, summary, answer)

    def reconcile(self, summary: Any, io: Any) -> Any:
        return self.real.reconcile(summary, io)


@pytest.fixture
def engine(sandbox: Any, server_db_url: str) -> Iterator[Any]:
    engine = demo_engine(server_db_url, sandbox.settings)
    yield engine
    engine.close()


@pytest.mark.parametrize("fire", [True, False], ids=["placed", "ticked"])
def test_an_order_is_leased_exactly_while_its_calls_are_in_flight(
    engine: Any, fire: bool
) -> None:
    registry = engine.registry
    watched = {
        name: LeaseSeen(registry.external(name), engine.db)
        for name in ("Ratepay/PaymentRequest", "Ratepay/ConfirmPayment")
    }
    for name, command in watched.items():
        registry.register_external(name, command)
    sent: list[str] = []

    def watch(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split()))

    ref = f"LEASE-{uuid.uuid4().hex[:8]}"
    event.listen(engine.db, "before_cursor_execute", watch)
    try:
        if fire:
            engine.place_order(example_order(ref))
        else:
            engine.place_order(example_order(ref), fire=False)
            assert not engine.tick(concurrency=1).errors
    finally:
        event.remove(engine.db, "before_cursor_execute", watch)
    assert engine.order(ref).states() == {"ready for shipment": 4}

    # Each call left while this worker held the order's lease, committed and unexpired: the
    # confirmation's too, which the request's settle planned after its compare-and-set had
    # dropped the lease (PostgreSQL).
    worker = engine.claims.worker_id
    for command in watched.values():
        assert command.seen == [(worker, True)]
    # And nobody holds it now.
    with engine.db.connect() as conn:
        holder = conn.execute(
            sa.select(Order.claimed_by).where(Order.order_ref == ref)
        ).scalar_one()
    assert holder is None

    standalone = [s for s in sent if s.startswith(LEASE)]
    if engine.db.dialect.name == "postgresql":
        # No lease statement of its own: the intent INSERTs write it (the tick's lock leases
        # its batch ahead instead), the settles' compare-and-sets drop it.
        assert standalone == []
        intents = [s for s in sent if s.startswith("WITH new_intent AS")]
        carrying = [s for s in intents if "leased AS (UPDATE oms_order SET claimed_by" in s]
        assert len(intents) == 2
        # Placed: both intents lease. Ticked: the lock leased the first call's order.
        assert len(carrying) == (2 if fire else 1)
        settles = [s for s in sent if "UPDATE oms_intent SET status" in s]
        assert len(settles) == 2
        assert all("released AS (UPDATE oms_order SET claimed_by" in s for s in settles)
    else:
        # Dropped by a statement of its own after the last settle (the drop names its holder).
        assert standalone, sent
        assert "oms_order.claimed_by =" in standalone[-1]
