"""Metrics through the OpenTelemetry metrics API, on the meter ``eventbus``.

With no SDK meter provider installed (and none given to the bus) nothing here is recorded and the hot paths skip
their clocks. Names follow the messaging semantic conventions where they have one:

- ``messaging.client.sent.messages``: events committed to the outbox (at the COMMIT of a bus transaction; at the
  offer for a transaction the bus does not own, which may still roll back);
- ``messaging.client.consumed.messages``: deliveries handed to a handler (each attempt);
- ``messaging.process.duration``: a handler attempt's duration, by subscriber and outcome;
- ``messaging.client.operation.duration``: the duration of the claim, settle and offer statements;

and ours where they have none: ``eventbus.handler.attempts`` (by outcome: ok, failed, timeout, duplicate),
``eventbus.dead_letters`` (new letters, by reason and subscriber), ``eventbus.relay.partitions.owned`` (per relay
process), and the gauges one elected relay per schema reads from the database (see :class:`Gauges`):
``eventbus.outbox.pending``, ``eventbus.outbox.in_flight``, ``eventbus.outbox.lag``, ``eventbus.subscriber.lag``,
``eventbus.subscriber.pending`` and ``eventbus.dead_letters.unreplayed``.

The counters are kept in this process and read by the SDK at collection (asynchronous counters): counting an
event costs a dictionary update, not an SDK call. Counters carry ``eventbus.tenant`` when the tenant is not the
default ``''``; histograms and gauges never do (drop it with an OpenTelemetry View when tenants are many).

A histogram measurement costs the Python SDK about 10 µs, more than a relay spends on a fast event. So
``messaging.process.duration`` records every attempt of a subscriber and outcome up to
:data:`PROCESS_RECORDS_PER_SECOND` a second, and beyond that an evenly spaced sample of them (one attempt each
time the allowance refills). Its quantiles stay those of all attempts; its count is then lower than the attempts
made, which ``eventbus.handler.attempts`` counts in full.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Histogram, Observation

from .tracing import SYSTEM, SdkInUse

__all__ = ["Gauges", "Metrics"]

#: The semantic conventions' advice for messaging durations, in seconds.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

#: How many attempts per second of one subscriber and outcome ``messaging.process.duration`` records at most.
PROCESS_RECORDS_PER_SECOND = 500.0

#: What ``messaging.operation.type`` each of our statements is.
_OPERATION_TYPES = {"offer": "send", "claim": "receive", "settle": "settle"}


@dataclass(slots=True)
class Gauges:
    """One schema's state as its elected relay last read it from the database."""

    pending: int = 0
    in_flight: int = 0
    #: How long the longest-waiting due pending row has waited since it came due, in seconds (0: none waits);
    #: rows waiting for a paused subscriber are left out (they wait on purpose).
    lag: float = 0.0
    #: Per subscriber: (rows waiting for it, its lag in seconds).
    subscribers: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: Dead letters not yet replayed, by (reason, subscriber).
    dead_letters: dict[tuple[str, str | None], int] = field(default_factory=dict)
    #: The relay worker that read them.
    reader: str = ""


class _Timed:
    __slots__ = ("metrics", "name", "schema", "started")

    def __init__(self, metrics: Metrics, name: str, schema: str) -> None:
        self.metrics, self.name, self.schema = metrics, name, schema
        self.started: float | None = None

    def __enter__(self) -> None:
        if self.metrics.enabled:
            self.started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if self.started is None:
            return
        attributes = {
            "messaging.system": SYSTEM, "messaging.operation.name": self.name,
            "messaging.operation.type": _OPERATION_TYPES[self.name], "eventbus.schema": self.schema,
        }  # fmt: skip
        if kind is not None:
            attributes["error.type"] = kind.__qualname__
        with contextlib.suppress(Exception):  # a failing SDK costs the figure, not the statement
            self.metrics.operation_duration.record(time.perf_counter() - self.started, attributes)


def _enabled(provider: metrics.MeterProvider) -> bool:
    # The API's proxy (no SDK installed yet) and its no-op provider; the proxy's class is private to the API.
    return type(provider).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider")


def _with_tenant(attributes: dict[str, Any], tenant: str) -> dict[str, Any]:
    if tenant:
        attributes["eventbus.tenant"] = tenant
    return attributes


class Metrics:
    """The instruments of the buses of one meter provider (default: the global one, so an SDK installed after
    the bus was made is used). Get it with :meth:`of`: instruments are made once per provider."""

    _made: ClassVar[dict[int, tuple[metrics.MeterProvider | None, Metrics]]] = {}

    @classmethod
    def of(cls, provider: metrics.MeterProvider | None = None) -> Metrics:
        made = cls._made.get(id(provider))
        if made is None or made[0] is not provider:
            made = (provider, cls(provider))
            cls._made[id(provider)] = made
        return made[1]

    def __init__(self, provider: metrics.MeterProvider | None = None) -> None:
        self._provider = provider
        meter = provider.get_meter("eventbus") if provider is not None else metrics.get_meter("eventbus")
        #: Cumulative counts, by their attributes' values (read at collection).
        self.sent: Counter[tuple[str, str]] = Counter()  # (topic, tenant)
        self.consumed: Counter[tuple[str, str, str]] = Counter()  # (subscriber, topic, tenant)
        self.attempts: Counter[tuple[str, str]] = Counter()  # (subscriber, outcome)
        self.dead_letters: Counter[tuple[str, str | None, str]] = Counter()  # (reason, subscriber, tenant)
        #: Per schema, what its elected relay in this process last read (absent: not elected here).
        self.gauges: dict[str, Gauges] = {}
        #: Per (schema, subscriber) whose consumers in this process read their broker consumers: (messages not
        #: yet acknowledged, the age in seconds of the oldest of them).
        self.broker: dict[tuple[str, str], tuple[int, float]] = {}
        #: Per relay worker of this process: its schema and how many partitions it owns now.
        self.relays: dict[str, tuple[str, Callable[[], int]]] = {}
        #: Per (subscriber, outcome): the duration records allowed now, and when that was worked out.
        self._allowance: dict[tuple[str, str], list[float]] = {}
        self._in_use = SdkInUse(provider, metrics.get_meter_provider, _enabled)

        meter.create_observable_counter(
            "messaging.client.sent.messages", [self._observe_sent], "{message}",
            "Events committed to the outbox (at the offer, for a transaction the bus does not own)",
        )  # fmt: skip
        meter.create_observable_counter(
            "messaging.client.consumed.messages", [self._observe_consumed], "{message}",
            "Deliveries handed to a handler (one per attempt)",
        )  # fmt: skip
        meter.create_observable_counter(
            "eventbus.handler.attempts", [self._observe_attempts], "{attempt}",
            "Handler attempts by outcome: ok, failed, timeout, duplicate (an identical redelivery, skipped)",
        )  # fmt: skip
        meter.create_observable_counter(
            "eventbus.dead_letters", [self._observe_dead_letters], "{letter}",
            "Dead letters written, by reason and subscriber",
        )  # fmt: skip
        self.process_duration: Histogram = meter.create_histogram(
            "messaging.process.duration", "s", "Duration of a handler attempt, by subscriber and outcome",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )  # fmt: skip
        self.operation_duration: Histogram = meter.create_histogram(
            "messaging.client.operation.duration", "s", "Duration of the claim, settle and offer statements",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )  # fmt: skip
        meter.create_observable_gauge(
            "eventbus.outbox.pending", [self._gauge(lambda g: [({}, g.pending)])], "{row}",
            "Outbox rows waiting to be claimed (due or delayed)",
        )  # fmt: skip
        meter.create_observable_gauge(
            "eventbus.outbox.in_flight", [self._gauge(lambda g: [({}, g.in_flight)])], "{row}",
            "Outbox rows claimed by a relay and not yet settled",
        )  # fmt: skip
        meter.create_observable_gauge(
            "eventbus.outbox.lag", [self._gauge(lambda g: [({}, g.lag)])], "s",
            "How long the longest-waiting due pending row has waited since it came due",
        )  # fmt: skip
        meter.create_observable_gauge(
            "eventbus.subscriber.lag",
            [self._gauge(lambda g: [({"messaging.consumer.group.name": name}, lag)
                                    for name, (_, lag) in g.subscribers.items()]), self._brokered(1)],
            "s", "How long the subscriber's longest-waiting due row (or unacknowledged broker message) has waited",
        )  # fmt: skip
        meter.create_observable_gauge(
            "eventbus.subscriber.pending",
            [self._gauge(lambda g: [({"messaging.consumer.group.name": name}, waiting)
                                    for name, (waiting, _) in g.subscribers.items()]), self._brokered(0)],
            "{row}", "Pending rows the subscriber has a share of (or broker messages it has not acknowledged)",
        )  # fmt: skip
        meter.create_observable_gauge(
            "eventbus.dead_letters.unreplayed",
            [self._gauge(lambda g: [({"eventbus.dead_letter.reason": reason,
                                      "messaging.consumer.group.name": subscriber or ""}, count)
                                    for (reason, subscriber), count in g.dead_letters.items()])],
            "{letter}", "Dead letters not yet replayed, by reason and subscriber",
        )  # fmt: skip
        meter.create_observable_gauge(
            "eventbus.relay.partitions.owned", [self._observe_partitions], "{partition}",
            "Key partitions each relay process owns",
        )  # fmt: skip

    @property
    def enabled(self) -> bool:
        """Whether anything is recorded (an SDK meter provider is in use)."""
        return bool(self._in_use)

    # -- recording ---------------------------------------------------------------------------------------------

    def operation(self, name: str, schema: str) -> _Timed:
        """Time one statement (``offer``, ``claim`` or ``settle``) into ``messaging.client.operation.duration``;
        a failed one carries ``error.type``. (A context manager of its own: this is on the offer's path.)"""
        return _Timed(self, name, schema)

    def processed(
        self, subscriber: str, topic: str, tenant: str, outcome: str, seconds: float | None, error_type: str | None
    ) -> None:
        """Count one handler attempt and, when timed, record its duration (within the allowance: see the module's
        documentation)."""
        self.consumed[(subscriber, topic, tenant)] += 1
        self.attempts[(subscriber, outcome)] += 1
        if seconds is not None and self._allowed((subscriber, outcome)):
            attributes = {
                "messaging.system": SYSTEM, "messaging.operation.name": "process",
                "messaging.destination.name": topic, "messaging.consumer.group.name": subscriber,
                "eventbus.outcome": outcome,
            }  # fmt: skip
            if error_type is not None:
                attributes["error.type"] = error_type
            self.process_duration.record(seconds, attributes)

    def _allowed(self, key: tuple[str, str]) -> bool:
        """Whether one more duration of ``key`` may be recorded now: a token bucket of
        :data:`PROCESS_RECORDS_PER_SECOND`, holding at most a second's worth."""
        now = time.monotonic()
        allowance = self._allowance.get(key)
        if allowance is None:
            self._allowance[key] = [PROCESS_RECORDS_PER_SECOND - 1, now]
            return True
        tokens = min(PROCESS_RECORDS_PER_SECOND, allowance[0] + (now - allowance[1]) * PROCESS_RECORDS_PER_SECOND)
        allowance[1] = now
        if tokens < 1:
            allowance[0] = tokens
            return False
        allowance[0] = tokens - 1
        return True

    # -- collection ----------------------------------------------------------------------------------------------

    def _observe_sent(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, _with_tenant({"messaging.system": SYSTEM, "messaging.operation.name": "publish",
                                         "messaging.destination.name": topic}, tenant))
            for (topic, tenant), n in list(self.sent.items())
        ]  # fmt: skip

    def _observe_consumed(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, _with_tenant({"messaging.system": SYSTEM, "messaging.operation.name": "process",
                                         "messaging.destination.name": topic,
                                         "messaging.consumer.group.name": subscriber}, tenant))
            for (subscriber, topic, tenant), n in list(self.consumed.items())
        ]  # fmt: skip

    def _observe_attempts(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {"messaging.consumer.group.name": subscriber, "eventbus.outcome": outcome})
            for (subscriber, outcome), n in list(self.attempts.items())
        ]

    def _observe_dead_letters(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, _with_tenant({"eventbus.dead_letter.reason": reason,
                                         "messaging.consumer.group.name": subscriber or ""}, tenant))
            for (reason, subscriber, tenant), n in list(self.dead_letters.items())
        ]  # fmt: skip

    def _observe_partitions(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(owned(), {"eventbus.schema": schema, "eventbus.relay": worker})
            for worker, (schema, owned) in list(self.relays.items())
        ]

    def _brokered(self, index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """The broker's figures of a subscriber, told apart from the outbox's by ``messaging.system``."""

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(figures[index], {"messaging.consumer.group.name": name, "eventbus.schema": schema,
                                             "messaging.system": "nats"})
                for (schema, name), figures in list(self.broker.items())
            ]  # fmt: skip

        return observe

    def _gauge(
        self, read: Callable[[Gauges], list[tuple[dict[str, Any], float]]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(value, {**attributes, "eventbus.schema": schema})
                for schema, gauges in list(self.gauges.items())
                for attributes, value in read(gauges)
            ]

        return observe
