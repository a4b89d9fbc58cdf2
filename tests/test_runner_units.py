"""Unit checks of the runner's bookkeeping that the flows only cover in part."""

from __future__ import annotations

from dataclasses import fields

from ratepay_oms.engine.runner import MAX_EVENT_REPEATS, LoopGuard, RunStats


def _filled(seed: int) -> RunStats:
    """A RunStats with a distinct value in every field (a new field is filled too)."""
    stats = RunStats()
    for n, f in enumerate(fields(RunStats)):
        value = getattr(stats, f.name)
        if isinstance(value, list):
            value.extend([(seed, f.name, n), (seed + 1, f.name, n)])
        else:
            setattr(stats, f.name, seed * 100 + n + 1)
    return stats


def test_run_stats_add_sums_every_field() -> None:
    """``RunStats.add`` names its fields one by one: a field added to the class but not to
    ``add`` would be dropped from every drive's figures."""
    total, first, second = _filled(1), _filled(1), _filled(5)
    total.add(second)
    for f in fields(RunStats):
        mine, theirs, got = getattr(first, f.name), getattr(second, f.name), getattr(total, f.name)
        if isinstance(mine, list):
            assert got == mine + theirs, f.name
        else:
            assert got == mine + theirs, f.name


def test_run_stats_add_keeps_its_own_lists() -> None:
    total, other = RunStats(), _filled(3)
    moves = total.moves
    total.add(other)
    total.add(RunStats())
    assert total.moves is moves and total.moves == other.moves
    assert other.moves is not total.moves


def test_loop_guard_counts_restores_and_stops() -> None:
    guard = LoopGuard()
    assert guard.allow(1, "new", "pay")
    start = guard.checkpoint()
    for _ in range(MAX_EVENT_REPEATS - 1):
        assert guard.allow(1, "new", "pay")
    assert guard.fired(1, "new", "pay") == MAX_EVENT_REPEATS
    assert not guard.allow(1, "new", "pay")
    assert guard.allow(2, "new", "pay")
    guard.restore(start)
    assert guard.fired(1, "new", "pay") == 1
    assert guard.fired(2, "new", "pay") == 0
    assert guard.allow(1, "new", "pay")
    assert start == {(1, "new", "pay"): 1}  # a restore leaves the checkpoint as it was
