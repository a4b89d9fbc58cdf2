"""Prometheus metrics: what the database says now, plus what this process did, over HTTP.

Two kinds of figures, served together:

* **read from the database at scrape time** (:class:`DatabaseCollector`): items per process
  and state, items waiting for a retry, open gateway-call intents by status, notifications by
  status and the age of the oldest pending one, order leases held and expired. Any process
  can serve these (``ratepay-oms metrics serve``); they are the same whoever asks.
* **counted by this process** (``ops.instruments``): transitions and errors by process and
  event, gateway calls by operation and result with a latency histogram, tick durations and
  items moved, lease takeovers, notification attempts. Only a worker has these
  (``ratepay-oms tick --loop --metrics-port P``); Prometheus sums them over workers.

A failing database does not fail the scrape: ``ratepay_oms_database_up`` turns 0 and the
database figures are left out, so an alert can tell "the database is down" from "no items".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from ratepay_oms.engine.clock import wall_now
from ratepay_oms.ops import instruments
from ratepay_oms.persistence.models import (
    INTENT_OPEN_STATUSES,
    OUTBOX_PENDING,
    OUTBOX_STATUSES,
    Intent,
    Order,
    OrderItem,
    OutboxEntry,
)
from ratepay_oms.process.model import ProcessDefinition

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
"""Loopback unless told otherwise: exposing the port is the operator's decision."""


class DatabaseCollector(Collector):
    """Gauges read from the database on every scrape (a handful of indexed GROUP BYs)."""

    def __init__(
        self,
        sessions: Callable[[], Session],
        definitions: Mapping[str, ProcessDefinition] | None = None,
    ) -> None:
        self.sessions = sessions
        self.definitions = definitions or {}

    def describe(self) -> Iterable[Metric]:
        return []  # collected lazily: no database query when the collector is registered

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        up = GaugeMetricFamily(
            "ratepay_oms_database_up", "1 when the last scrape could read the database."
        )
        try:
            families = list(self._read())
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot read the database: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families
        took = GaugeMetricFamily(
            "ratepay_oms_database_scrape_duration_seconds",
            "Time the last scrape spent reading the database.",
        )
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _read(self) -> Iterator[Metric]:
        now = wall_now()
        with self.sessions() as session:
            items = GaugeMetricFamily(
                "ratepay_oms_items", "Order items per process and state.",
                labels=["process", "state"],
            )
            counts: dict[tuple[str, str], int] = {
                (name, state): 0
                for name, definition in self.definitions.items()
                for state in definition.states
            }
            for process, state, count in session.execute(
                select(OrderItem.process, OrderItem.state, func.count())
                .group_by(OrderItem.process, OrderItem.state)
            ):
                counts[(process, state)] = int(count)
            for (process, state), count in sorted(counts.items()):
                items.add_metric([process, state], count)
            yield items

            retrying = GaugeMetricFamily(
                "ratepay_oms_items_retry_waiting",
                "Items whose last event failed and that wait for a retry, per process.",
                labels=["process"],
            )
            for process, count in session.execute(
                select(OrderItem.process, func.count())
                .where(OrderItem.retry_at.is_not(None))
                .group_by(OrderItem.process)
            ):
                retrying.add_metric([process], int(count))
            yield retrying

            intents = GaugeMetricFamily(
                "ratepay_oms_intents_open",
                "Gateway calls whose outcome is not applied yet, by status (pending: the tick "
                "reconciles; unknown: a person decides).",
                labels=["status"],
            )
            open_counts = dict.fromkeys(INTENT_OPEN_STATUSES, 0)
            for status, count in session.execute(
                select(Intent.status, func.count())
                .where(Intent.status.in_(INTENT_OPEN_STATUSES))
                .group_by(Intent.status)
            ):
                open_counts[status] = int(count)
            for status, count in open_counts.items():
                intents.add_metric([status], count)
            yield intents

            outbox = GaugeMetricFamily(
                "ratepay_oms_notifications", "State-change notifications in the outbox, by status.",
                labels=["status"],
            )
            by_status = dict.fromkeys(OUTBOX_STATUSES, 0)
            for status, count in session.execute(
                select(OutboxEntry.status, func.count()).group_by(OutboxEntry.status)
            ):
                by_status[status] = int(count)
            for status, count in by_status.items():
                outbox.add_metric([status], count)
            yield outbox

            oldest = session.scalar(
                select(func.min(OutboxEntry.created_at)).where(
                    OutboxEntry.status == OUTBOX_PENDING
                )
            )
            age = GaugeMetricFamily(
                "ratepay_oms_notifications_oldest_pending_age_seconds",
                "Age of the oldest notification not delivered yet (0 when none).",
            )
            age.add_metric([], max((now - oldest).total_seconds(), 0.0) if oldest else 0.0)
            yield age

            leases = GaugeMetricFamily(
                "ratepay_oms_leases", "Order leases by whether they are still valid.",
                labels=["state"],
            )
            leased = Order.claimed_by.is_not(None)
            held = session.scalar(
                select(func.count()).select_from(Order).where(leased, Order.claim_expires_at >= now)
            )
            expired = session.scalar(
                select(func.count()).select_from(Order).where(leased, Order.claim_expires_at < now)
            )
            leases.add_metric(["held"], int(held or 0))
            leases.add_metric(["expired"], int(expired or 0))
            yield leases


class _Forward(Collector):
    """Serves another registry's metrics (the process's instruments) from ours."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(self.registry.collect())


def build_registry(
    sessions: Callable[[], Session] | None,
    definitions: Mapping[str, ProcessDefinition] | None = None,
    *,
    instruments_too: bool = True,
    process: bool = True,
) -> CollectorRegistry:
    """A registry to serve: database gauges (``sessions``), this process's instruments and
    the standard ``process_*`` figures (CPU, memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    if sessions is not None:
        registry.register(DatabaseCollector(sessions, definitions))
    if instruments_too:
        registry.register(_Forward(instruments.REGISTRY))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> str:
    """The Prometheus text exposition format (what ``GET /metrics`` returns)."""
    return generate_latest(registry).decode("utf-8")


class MetricsServer:
    """``/metrics`` over HTTP on a daemon thread; ``port`` 0 picks a free one."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = DEFAULT_HOST) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
