"""A state an item only passes through: the move into it and the move on out of it are
written as one statement on PostgreSQL, and read back exactly as two moves on every database.

``payment confirmed`` is such a state in the invoice process: its on-enter event ``prepare for
shipment`` has no command and leads to ``ready for shipment`` without a condition. Real engine,
real sandbox over HTTP, real databases.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from ratepay_oms.demo import demo_engine, example_order

PATH = [
    (None, "new", None),
    ("new", "payment request initialized", "init payment request"),
    ("payment request initialized", "payment confirmation initialized", "do payment request"),
    ("payment confirmation initialized", "payment confirmed", "create payment confirmation"),
    ("payment confirmed", "ready for shipment", "prepare for shipment"),
]


@pytest.fixture
def shared(sandbox: Any, server_db_url: str) -> Iterator[Any]:
    engine = demo_engine(server_db_url, sandbox.settings)
    yield engine
    engine.close()


def _move_statements(db: sa.Engine) -> tuple[list[str], Any]:
    """The statements that write an item's state, as the engine sends them."""
    seen: list[str] = []

    def watch(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = " ".join(statement.split())
        if "UPDATE oms_order_item SET state=" in text:
            seen.append(text)

    return seen, watch


def test_a_state_passed_through_reads_as_two_moves(shared: Any) -> None:
    engine = shared
    ref = f"HOPS-{uuid.uuid4().hex[:8]}"
    engine.place_order(example_order(ref), fire=False)
    seen, watch = _move_statements(engine.db)
    event.listen(engine.db, "before_cursor_execute", watch)
    try:
        result = engine.tick(concurrency=1)
    finally:
        event.remove(engine.db, "before_cursor_execute", watch)
    assert not result.errors
    view = engine.order(ref)
    assert view.states() == {"ready for shipment": 4}

    # History: every item walked the whole path, the state passed through included, each
    # step a row of its own in the order taken.
    history = engine.history(ref)
    items = sorted({h.item_id for h in history})
    assert len(items) == 4
    for item in items:
        steps = [(h.from_state, h.to_state, h.event) for h in history if h.item_id == item]
        assert steps == PATH
    # The two hops happened at the same moment (the settle's).
    last_two = [h for h in history if h.to_state in ("payment confirmed", "ready for shipment")]
    assert len({h.created_at for h in last_two}) == 1

    # Transition log: the first hop by the confirmation's command and condition, the second
    # by the on-enter event alone.
    entries = [e for e in engine.transition_log(ref) if not e.is_error]
    confirmed = [e for e in entries if e.target_state == "payment confirmed"]
    onward = [e for e in entries if e.target_state == "ready for shipment"]
    assert len(confirmed) == len(onward) == 4
    assert {(e.source_state, e.event, e.command, e.condition) for e in confirmed} == {
        ("payment confirmation initialized", "create payment confirmation",
         "Ratepay/ConfirmPayment", "Ratepay/IsPaymentConfirmed")
    }
    assert {(e.source_state, e.event, e.command, e.condition) for e in onward} == {
        ("payment confirmed", "prepare for shipment", None, None)
    }

    # The tick's counts see both hops.
    assert result.items_moved == 4 * (len(PATH) - 1)

    # PostgreSQL writes the two hops as one statement (straight to the state passed on to);
    # the other databases move the items into the state passed through and out again.
    expected = 3 if engine.db.dialect.name == "postgresql" else 4  # moves for four steps
    assert len(seen) == expected, seen
