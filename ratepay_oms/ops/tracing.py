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
    from opentelemetry.trace import NonRecordingSpan as _NonRecordingSpan
    from opentelemetry.trace import ProxyTracerProvider as _ProxyTracerProvider
except ImportError:  # pragma: no cover - exercised in the test that hides the package
    _trace = None  # type: ignore[assignment]

_OTEL = _trace
"""The real ``opentelemetry.trace`` (a test may stand another module in for ``_trace``)."""

TRACER_NAME = "ratepay_oms"

_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext(None)


def enabled() -> bool:
    return _trace is not None


def span(
    name: str, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A span named ``name`` (current span as parent); yields it, or ``None`` without OTel.

    An exception leaving the block is recorded on the span and re-raised unchanged.

    With the API but no SDK (no tracer provider set) OpenTelemetry's no-op tracer would
    start nothing: it yields the current span, a non-recording one, and makes it current
    again, at some 50 Python calls a span (three per order). That span is yielded here
    directly; the moment a provider is set, spans are started through it.
    """
    trace = _trace
    if trace is None:
        return _NO_SPAN
    if trace is _OTEL and isinstance(trace.get_tracer_provider(), _ProxyTracerProvider):
        current = trace.get_current_span()
        if isinstance(current, _NonRecordingSpan):
            return contextlib.nullcontext(current)
    return _started(name, attributes)


@contextlib.contextmanager
def _started(name: str, attributes: Mapping[str, Any] | None) -> Iterator[Any]:
    tracer = _trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(name, attributes=dict(attributes or {})) as current:
        yield current
