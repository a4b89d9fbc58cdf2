"""The engine's own Prometheus instruments: what a worker process did since it started.

Counters and histograms live in :data:`REGISTRY`, a registry of our own (not
``prometheus_client.REGISTRY``), so an embedding application decides whether to expose them
(``prometheus_client.REGISTRY.register(...)`` or ``ratepay_oms.ops.metrics.serve``) and a test
can read them without picking up the host's metrics.

Moves and errors are counted when the transaction that wrote them commits, not when they are
written: a batch the database rolls back never happened, and must not be counted either. The
writer notes them on the session (:func:`note_moves`, :func:`note_error`); a listener on
every ``Session`` adds them to the counters after a commit and drops them after a rollback.

Names follow Prometheus conventions: ``ratepay_oms_`` prefix, ``_total`` for counters,
``_seconds`` for durations (base units).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import event
from sqlalchemy.orm import Session

REGISTRY = CollectorRegistry(auto_describe=True)

TRANSITIONS = Counter(
    "ratepay_oms_transitions_total",
    "Items moved from one state to another, by process and event ('' for event-less).",
    ["process", "event"],
    registry=REGISTRY,
)
TRANSITION_ERRORS = Counter(
    "ratepay_oms_transition_errors_total",
    "Failed events (command raised, condition failed, gateway error), per item, "
    "by process and event.",
    ["process", "event"],
    registry=REGISTRY,
)
GATEWAY_CALLS = Counter(
    "ratepay_oms_gateway_calls_total",
    "RatePAY gateway calls by operation and result (success, declined, error).",
    ["operation", "result"],
    registry=REGISTRY,
)
GATEWAY_LATENCY = Histogram(
    "ratepay_oms_gateway_call_duration_seconds",
    "Wall time of one RatePAY gateway call, request sent to answer parsed.",
    ["operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
TICKS = Counter(
    "ratepay_oms_ticks_total", "Ticks run by this process.", registry=REGISTRY
)
TICK_DURATION = Histogram(
    "ratepay_oms_tick_duration_seconds",
    "Wall time of one tick (all steps, gateway calls and notification delivery).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    registry=REGISTRY,
)
TICK_ITEMS_MOVED = Counter(
    "ratepay_oms_tick_items_moved_total",
    "Items the tick moved (a sum over ticks; see ratepay_oms_transitions_total for the split).",
    registry=REGISTRY,
)
LEASE_TAKEOVERS = Counter(
    "ratepay_oms_lease_takeovers_total",
    "Order leases taken over from another worker whose lease had expired (it died or hung).",
    registry=REGISTRY,
)
NOTIFICATIONS = Counter(
    "ratepay_oms_notifications_total",
    "State-change notification delivery attempts by result (delivered, failed, dead).",
    ["result"],
    registry=REGISTRY,
)

_PENDING_KEY = "ratepay_oms.metrics.pending"

_MOVES = "moves"
_ERRORS = "errors"
_TAKEOVERS = "takeovers"

_Pending = dict[tuple[str, str, str], int]
"""What a session's open transaction counted: (kind, process, event) to a count. One plain
dict per transaction: it is made for nearly every transaction of every order, so three
``Counter`` objects (each through its ``__init__`` and ``update``) cost more than the
counting."""

_CHILDREN: dict[tuple[Counter, str, str], Any] = {}
"""Labelled children of :data:`TRANSITIONS` / :data:`TRANSITION_ERRORS` by (metric, process,
event). ``labels`` checks and looks the labels up under a lock on every call; a child lives
as long as its metric (nothing here removes one), and the keys are bounded by the processes'
events, so it is looked up once per process and event."""


def _pending(session: Session) -> _Pending:
    found: _Pending | None = session.info.get(_PENDING_KEY)
    if found is None:
        found = session.info[_PENDING_KEY] = {}
    return found


def _note(session: Session, key: tuple[str, str, str], count: int) -> None:
    pending = _pending(session)
    pending[key] = pending.get(key, 0) + count


def note_moves(session: Session, process: str, event_name: str | None, count: int) -> None:
    """``count`` items moved by ``event_name`` in ``session``'s open transaction."""
    if count:
        _note(session, (_MOVES, process, event_name or ""), count)


def note_error(session: Session, process: str, event_name: str | None, count: int = 1) -> None:
    """A failed event recorded in ``session``'s open transaction."""
    if count:
        _note(session, (_ERRORS, process, event_name or ""), count)


def note_takeovers(session: Session, count: int) -> None:
    """Expired leases of other workers cleared in ``session``'s open transaction."""
    if count:
        _note(session, (_TAKEOVERS, "", ""), count)


def _child(metric: Counter, process: str, name: str) -> Any:
    key = (metric, process, name)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(process, name)
    return child


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    pending: _Pending | None = session.info.pop(_PENDING_KEY, None)
    if not pending:
        return
    for (kind, process, name), count in pending.items():
        if kind == _TAKEOVERS:
            LEASE_TAKEOVERS.inc(count)
        else:
            _child(TRANSITIONS if kind == _MOVES else TRANSITION_ERRORS, process, name).inc(
                count
            )


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_PENDING_KEY, None)


def gateway_call(operation: str, result: str, seconds: float) -> None:
    """One gateway call: ``result`` is ``success``, ``declined`` (an answer that refuses) or
    ``error`` (timeout, HTTP error, malformed answer)."""
    children = _GATEWAY_CHILDREN.get((operation, result))
    if children is None:
        children = _GATEWAY_CHILDREN[(operation, result)] = (
            GATEWAY_CALLS.labels(operation, result),
            GATEWAY_LATENCY.labels(operation),
        )
    children[0].inc()
    children[1].observe(seconds)


_GATEWAY_CHILDREN: dict[tuple[str, str], tuple[Any, Any]] = {}
"""The counter and histogram child of each (operation, result): ``labels()`` looks them up
under a lock on every call otherwise. Bounded by the operations times three results; nothing
removes labelled children from these metrics."""


def tick_done(seconds: float, items_moved: int) -> None:
    TICKS.inc()
    TICK_DURATION.observe(seconds)
    TICK_ITEMS_MOVED.inc(items_moved)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one sample (0.0 when it was never recorded): for tests and the
    console."""
    value: Any = REGISTRY.get_sample_value(name, labels or {})
    return float(value or 0.0)
