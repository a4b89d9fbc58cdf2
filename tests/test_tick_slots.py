"""A batch puts back the orders that would call the gateway beyond its free slots before it
reads their items (``tick._beyond_slots``), keeping the ones leased along with the lock."""

from __future__ import annotations

from ratepay_oms.engine.tick import _beyond_slots, _Due


def _batch(calls: dict[int, bool]) -> dict[int, _Due]:
    return {o: _Due(o, 1, 1.0, c) for o, c in calls.items()}


def test_orders_beyond_the_slots_are_put_back_quiet_ones_kept() -> None:
    batch = _batch({1: True, 2: False, 3: True, 4: True, 5: False, 6: True})
    kept, later = _beyond_slots(batch, [1, 2, 3, 4, 5, 6], 2, set())
    assert kept == [1, 2, 3, 5]
    assert later == [4, 6]


def test_orders_leased_with_the_lock_keep_their_slots() -> None:
    batch = _batch({1: True, 2: True, 3: True, 4: False})
    kept, later = _beyond_slots(batch, [1, 2, 3, 4], 1, {3})
    assert kept == [3, 4]
    assert later == [1, 2]


def test_nothing_put_back_within_the_slots() -> None:
    batch = _batch({1: True, 2: False, 3: True})
    assert _beyond_slots(batch, [1, 3], 2, set()) == ([1, 3], [])
    assert _beyond_slots(batch, [2], 1, set()) == ([2], [])


def test_the_tick_adds_up_counts_and_error_messages_only() -> None:
    """``_Counts.add`` sums every count field of ``RunStats`` and keeps the error messages;
    the per-item lists stay empty however much a tick moves."""
    from dataclasses import fields

    from ratepay_oms.engine.runner import RunStats
    from ratepay_oms.engine.tick import _Counts

    one = RunStats(items_moved=3, commands_run=2, errors=0, retries_scheduled=1)
    one.error("boom")
    one.moves.append((1, "a", "b"))
    one.stayed.append(2)
    one.failed.append((3, "x"))
    one.held.append((4, "y"))
    total = _Counts()
    total.add(one)
    total.add(one)
    for f in fields(RunStats):
        value = getattr(total, f.name)
        if f.name == "error_messages":
            assert value == ["boom", "boom"]
        elif isinstance(value, list):
            assert value == [], f.name
        else:
            assert value == 2 * getattr(one, f.name), f.name


def test_a_batch_reads_the_items_of_an_order_it_calls_for_once(
    sandbox: object, fresh_db_url: str
) -> None:
    """The batch that plans an order's gateway call reads the order's items once, as the
    objects it fires (``_StateStep.loaded_due_items``), not as columns first and objects
    after; the order still walks to ``ready for shipment`` and its payment request carries
    every item, on every dialect."""
    import uuid

    from sqlalchemy import event

    from ratepay_oms.demo import demo_engine, example_order

    engine = demo_engine(fresh_db_url, sandbox.settings)  # type: ignore[attr-defined]
    try:
        ref = f"TS-{uuid.uuid4().hex[:8]}"
        engine.place_order(example_order(ref), fire=False)
        reads: list[str] = []

        def seen(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
            if statement.startswith("SELECT") and "FROM oms_order_item" in statement:
                reads.append(statement)

        event.listen(engine.db, "before_cursor_execute", seen)
        try:
            result = engine.tick()
        finally:
            event.remove(engine.db, "before_cursor_execute", seen)
        assert result.errors == 0
        view = engine.order(ref)
        assert view.states() == {"ready for shipment": len(view.items)}
        item_reads = [s for s in reads if s.startswith("SELECT oms_order_item.id")]
        assert len(item_reads) == 1, item_reads
        assert "oms_order_item.order_id" in item_reads[0].split("WHERE", 1)[1]
    finally:
        engine.close()
