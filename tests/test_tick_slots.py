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
