"""OpenTelemetry spans around gateway calls and ticks, when ``opentelemetry-api`` is installed.

Tracing is an extra (``pip install 'ratepay-oms[otel]'``): without the package :func:`span`
is a no-op context manager, so product code calls it unconditionally. With the API but no SDK
configured the spans are OpenTelemetry's own no-ops; the host application installs an SDK and
exporter to see them. Attributes carry names and counts only, never order data or secrets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
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


_tracer: tuple[Any, Any] = (None, None)
"""(the ``trace`` module it came from, our tracer): ``get_tracer`` looks the tracer provider up
(reading the environment) and builds a tracer on every call, for the same tracer each time. A
provider the host installs later is still used: before one is set OpenTelemetry hands out a
proxy tracer that switches over to it."""


def _get_tracer() -> Any:
    global _tracer
    source, tracer = _tracer
    if source is not _trace:  # first use, or the module replaced (a test's stand-in)
        tracer = _trace.get_tracer(TRACER_NAME)
        _tracer = (_trace, tracer)
    return tracer


def _started(
    name: str, attributes: Mapping[str, Any] | None
) -> contextlib.AbstractContextManager[Any]:
    """OpenTelemetry's own context manager, handed out as it is (not wrapped in a generator of
    ours): a span opens around every gateway call."""
    manager: contextlib.AbstractContextManager[Any] = _get_tracer().start_as_current_span(
        name, attributes=dict(attributes or {})
    )
    return manager
