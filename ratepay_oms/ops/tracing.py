"""OpenTelemetry spans around gateway calls and ticks, when ``opentelemetry-api`` is installed.

Tracing is an extra (``pip install 'ratepay-oms[otel]'``): without the package :func:`span`
is a no-op context manager, so product code calls it unconditionally. With the API but no SDK
configured the spans are OpenTelemetry's own no-ops; the host application installs an SDK and
exporter to see them. Attributes carry names and counts only, never order data or secrets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

try:  # the extra
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised in the test that hides the package
    _trace = None  # type: ignore[assignment]

TRACER_NAME = "ratepay_oms"


def enabled() -> bool:
    return _trace is not None


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A span named ``name`` (current span as parent); yields it, or ``None`` without OTel.

    An exception leaving the block is recorded on the span and re-raised unchanged.
    """
    if _trace is None:
        yield None
        return
    tracer = _trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(name, attributes=dict(attributes or {})) as current:
        yield current
