"""Traces: a PRODUCER span for each publish, its W3C context carried in the row headers, and a CONSUMER span for
each handler attempt parented on it, so a trace runs from the producer's request through every handler and the
follow-up events they publish.

Uses only ``opentelemetry-api``. With no SDK tracer provider installed (and none given to the bus) every call
here is a cheap no-op. Attribute names follow the OpenTelemetry messaging semantic conventions.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, Status, StatusCode

__all__ = ["Tracing", "trace_id_of"]

#: ``messaging.system`` of events the in-process transport delivers (the conventions list no value for an
#: outbox; a broker transport names its broker).
SYSTEM = "eventbus"


def trace_id_of(headers: Mapping[str, str]) -> str | None:
    """The trace id in a W3C ``traceparent`` header (``00-<trace id>-<span id>-<flags>``), else None."""
    parent = headers.get("traceparent")
    if parent is None:
        return None
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def current_trace_id(span: Span | None) -> str | None:
    """The trace id of ``span`` as 32 hex digits, or None for a span that records nothing."""
    if span is None:
        return None
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def _enabled(provider: trace.TracerProvider) -> bool:
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def _same(value: Any) -> Any:
    return value


class SdkInUse:
    """Whether an OpenTelemetry SDK provider is in use: ``provider`` if given, else the global one as
    ``lookup()`` returns it. Once it is, it stays so (the global provider can be set once); until then it is
    looked up again at most once a second, so that the hot paths pay a clock read, not a lookup."""

    __slots__ = ("_checked", "_is_sdk", "_lookup", "_yes")

    def __init__(self, provider: Any, lookup: Callable[[], Any], is_sdk: Callable[[Any], bool]) -> None:
        self._lookup: Callable[[], Any] = lookup if provider is None else functools.partial(_same, provider)
        self._is_sdk = is_sdk
        self._yes = False
        self._checked = -1.0

    def __bool__(self) -> bool:
        if self._yes:
            return True
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            self._yes = self._is_sdk(self._lookup())
        return self._yes


class Tracing:
    """Spans of one bus, on the tracer ``eventbus`` of ``provider`` (default: the global tracer provider, looked
    up at each span, so an SDK installed after the bus was made is used)."""

    def __init__(
        self, provider: trace.TracerProvider | None = None, *, redact: Callable[[str], str] | None = None
    ) -> None:
        self._provider = provider
        self._redact = redact
        self._tracer = provider.get_tracer("eventbus") if provider is not None else trace.get_tracer("eventbus")
        self._in_use = SdkInUse(provider, trace.get_tracer_provider, _enabled)

    @property
    def enabled(self) -> bool:
        """Whether spans record anything (an SDK tracer provider is in use)."""
        return bool(self._in_use)

    def publish(self, topic: str, headers: dict[str, str]) -> AbstractContextManager[Any]:
        """A PRODUCER span for one event's publish, made current; its context goes into ``headers`` (as
        ``traceparent``/``tracestate``) for the consumer spans to continue. Without an SDK, the caller's current
        context (another instrumentation's, if any) is injected and no span is made."""
        if not self.enabled:
            propagate.inject(headers)
            return nullcontext()
        return self._publish(topic, headers)

    @contextmanager
    def _publish(self, topic: str, headers: dict[str, str]) -> Iterator[Span]:
        with self._tracer.start_as_current_span(
            f"publish {topic}",
            kind=trace.SpanKind.PRODUCER,
            # Not the SDK's own: it would record the exception's text unredacted.
            record_exception=False,
            set_status_on_exception=False,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.name": "publish",
                "messaging.operation.type": "send",
                "messaging.destination.name": topic,
            },
        ) as span:
            propagate.inject(headers)
            try:
                yield span
            except BaseException as exc:
                failed(span, type(exc).__qualname__, self._describe(exc))
                raise

    def _describe(self, exc: BaseException) -> str:
        """An exception's text for a span's status: DSN passwords removed and the bus's redaction applied."""
        from .._driver import redact_dsn  # the boundary module imports nothing of this package

        try:
            text = redact_dsn(f"{type(exc).__name__}: {exc}")
        except Exception:
            return type(exc).__name__
        return self._redact(text) if self._redact is not None else text

    def process(
        self, subscriber: str, topic: str, event_id: uuid.UUID, headers: Mapping[str, str], attempt: int
    ) -> AbstractContextManager[Span | None]:
        """A CONSUMER span for one handler attempt, parented on the producer's context from the row headers and
        current while the handler runs (so its follow-up publishes continue the trace)."""
        if not self.enabled:
            return nullcontext()
        return self._process(subscriber, topic, event_id, headers, attempt)

    @contextmanager
    def _process(
        self, subscriber: str, topic: str, event_id: uuid.UUID, headers: Mapping[str, str], attempt: int
    ) -> Iterator[Span]:
        context = propagate.extract(headers) if "traceparent" in headers else None
        with self._tracer.start_as_current_span(
            f"process {topic}",
            context=context,
            kind=trace.SpanKind.CONSUMER,
            record_exception=False,
            set_status_on_exception=False,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.name": "process",
                "messaging.operation.type": "process",
                "messaging.destination.name": topic,
                "messaging.consumer.group.name": subscriber,
                "messaging.message.id": str(event_id),
                "eventbus.attempt": attempt,
            },
        ) as span:
            yield span


def failed(span: Span | None, error_type: str, message: str | None) -> None:
    """Mark a process span as failed (``error.type`` and an error status with the redacted message)."""
    if span is None:
        return
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, message))
