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

from collections import defaultdict
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


def _pending(session: Session) -> dict[str, defaultdict[tuple[str, str], int]]:
    """The tallies of ``session``'s open transaction (``defaultdict(int)``: a ``Counter``
    makes its every new key and its own construction Python calls)."""
    found: dict[str, defaultdict[tuple[str, str], int]] | None = session.info.get(_PENDING_KEY)
    if found is None:
        found = session.info[_PENDING_KEY] = {
            "moves": defaultdict(int), "errors": defaultdict(int), "takeovers": defaultdict(int)
        }
    return found


def note_moves(session: Session, process: str, event_name: str | None, count: int) -> None:
    """``count`` items moved by ``event_name`` in ``session``'s open transaction."""
    if count:
        _pending(session)["moves"][(process, event_name or "")] += count


def note_error(session: Session, process: str, event_name: str | None, count: int = 1) -> None:
    """A failed event recorded in ``session``'s open transaction."""
    if count:
        _pending(session)["errors"][(process, event_name or "")] += count


def note_takeovers(session: Session, count: int) -> None:
    """Expired leases of other workers cleared in ``session``'s open transaction."""
    if count:
        _pending(session)["takeovers"][("", "")] += count


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING_KEY, None)
    if not pending:
        return
    for key, count in pending["moves"].items():
        _child(_TRANSITION_CHILDREN, TRANSITIONS, key).inc(count)
    for key, count in pending["errors"].items():
        _child(_TRANSITION_ERROR_CHILDREN, TRANSITION_ERRORS, key).inc(count)
    for count in pending["takeovers"].values():
        LEASE_TAKEOVERS.inc(count)


_CHILDREN_MAX = 4096
"""Labelled children kept at hand per metric: (process, event) pairs come from the loaded
process definitions, a bounded set; the bound only guards a worker that loads new ones
for ever."""
_TRANSITION_CHILDREN: dict[tuple[str, ...], Any] = {}
_TRANSITION_ERROR_CHILDREN: dict[tuple[str, ...], Any] = {}


def _child(children: dict[tuple[str, ...], Any], metric: Any, key: tuple[str, ...]) -> Any:
    """``metric.labels(*key)``, looked up once per key (``labels()`` takes a lock and
    validates its arguments on every call); nothing removes children from these metrics."""
    child = children.get(key)
    if child is None:
        if len(children) >= _CHILDREN_MAX:
            children.clear()
        child = children[key] = metric.labels(*key)
    return child


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
