"""OpenTelemetry: W3C trace context carried in row headers, and a consumer span around each handler attempt.

Uses only ``opentelemetry-api``; with no SDK configured every call here is a cheap no-op.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import propagate, trace

__all__ = ["handle_span", "inject_headers", "tracing_enabled"]

_tracer = trace.get_tracer("eventbus")


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context (traceparent, tracestate) to ``headers`` and return them."""
    propagate.inject(headers)
    return headers


def tracing_enabled() -> bool:
    """Whether an SDK tracer provider is installed (until then spans cost time and record nothing)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def handle_span(
    subscriber: str, topic: str, headers: Mapping[str, str], attempt: int
) -> AbstractContextManager[Any]:
    """A consumer span for one handler attempt, parented on the producer's context from the row headers."""
    if not tracing_enabled():
        return nullcontext()
    return _handle_span(subscriber, topic, headers, attempt)


@contextmanager
def _handle_span(subscriber: str, topic: str, headers: Mapping[str, str], attempt: int) -> Iterator[Any]:
    context = propagate.extract(headers) if "traceparent" in headers else None
    with _tracer.start_as_current_span(
        f"{topic} process",
        context=context,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "eventbus",
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": subscriber,
            "eventbus.attempt": attempt,
        },
    ) as span:
        yield span
