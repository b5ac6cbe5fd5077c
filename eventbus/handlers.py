"""Typed handlers: what ``@bus.subscribe`` records, the ``Context`` a handler receives, and one attempt's run.

An attempt decodes the payload into the handler's type, runs the handler under its timeout (inside a
transaction that first enters the inbox, for a transactional subscriber) and turns whatever happened into an
:class:`Outcome`. Nothing here decides where the outcome goes; the relay writes it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import random
import time
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum
from typing import Any, Protocol, TypedDict, Unpack

import anyio
import msgspec
from opentelemetry import trace

from ._threads import ThreadPools
from ._typing import Connection
from .errors import ConfigurationError, DeserializationError, NotInTransaction, RegistrationError, UnknownTopic
from .events import Envelope, Registry, aliases_of, topic_of
from .observability import logs
from .observability.metrics import Metrics
from .observability.tracing import Tracing, current_trace_id, failed, trace_id_of
from .repositories import InboxRepository, NewEvent, OfferResult, Reason, cap_error

__all__ = [
    "AttemptRunner", "Backoff", "Context", "Outcome", "PublishOptions", "SubscribeOptions", "Subscription", "Verdict",
    "subscription_for",
]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits ``initial * factor**(n-1)`` seconds, at most ``maximum``,
    spread by ``±jitter`` (a fraction) so that retries of many events do not arrive together."""

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


class PublishOptions(TypedDict, total=False):
    """The options of a publish: ``key`` orders and partitions (ordered subscribers handle a key's events one
    at a time), ``delay`` holds delivery back, ``idempotency_key`` makes a repeated publish insert nothing (per
    tenant), ``headers`` travel with the event, ``tenant`` defaults to the bus's, ``target`` names the one
    subscriber to deliver to."""

    key: str | None
    delay: float | timedelta | None
    idempotency_key: str | None
    headers: dict[str, str] | None
    tenant: str | None
    target: str | None


class Publisher(Protocol):
    """What a handler's ``ctx.publish`` needs from the bus."""

    def encode(self, event: msgspec.Struct, **options: Unpack[PublishOptions]) -> NewEvent: ...

    async def offer_follow_up(self, events: Sequence[NewEvent], connection: Connection | None) -> OfferResult: ...


class Context:
    """What a handler knows about the delivery it is handling."""

    __slots__ = ("_connection", "_publisher", "attempt", "event_id", "headers", "key", "subscriber", "tenant", "topic")

    def __init__(
        self,
        envelope: Envelope,
        subscriber: str,
        attempt: int,
        publisher: Publisher,
        connection: Connection | None = None,
    ) -> None:
        self.event_id: uuid.UUID = envelope.event_id
        self.topic: str = envelope.topic
        self.key: str | None = envelope.key
        self.tenant: str = envelope.tenant
        self.headers: Mapping[str, str] = envelope.headers
        self.attempt: int = attempt
        self.subscriber: str = subscriber
        self._publisher = publisher
        self._connection = connection

    @property
    def connection(self) -> Connection:
        """The transaction this handler's writes share with its inbox row (transactional subscribers only)."""
        if self._connection is None:
            raise ConfigurationError(
                f"subscriber {self.subscriber!r} has no ctx.connection: declare it with "
                "@bus.subscribe(transactional=True) to run the handler in a transaction with its inbox row"
            )
        return self._connection

    async def publish(self, event: msgspec.Struct, **options: Unpack[PublishOptions]) -> uuid.UUID | None:
        """Publish a follow-up event (options: :class:`PublishOptions`): in the handler's transaction when it has
        one, else in one of its own. It inherits this event's tenant (unless ``tenant`` is given) and
        correlation id, and its headers carry this event's id as its causation id.
        """
        merged = {"causation_id": str(self.event_id), **(options.get("headers") or {})}
        if "correlation_id" in self.headers:
            merged.setdefault("correlation_id", self.headers["correlation_id"])
        options["headers"] = merged
        if options.get("tenant") is None:
            options["tenant"] = self.tenant
        new = self._publisher.encode(event, **options)
        return (await self._publisher.offer_follow_up([new], self._connection)).ids[0]


@dataclass(frozen=True, slots=True)
class Subscription:
    """A registered handler and its delivery settings."""

    name: str
    handler: Callable[..., Any]
    event_types: tuple[type[msgspec.Struct], ...]
    timeout: float = 30.0
    max_attempts: int = 5
    backoff: Backoff = field(default_factory=Backoff)
    transactional: bool = False
    ordered: bool = False
    concurrency: int = 1
    is_async: bool = True
    takes_context: bool = True

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics it takes: its event classes' topic names and their aliases."""
        return tuple(name for cls in self.event_types for name in (topic_of(cls), *aliases_of(cls)))


def _event_types(annotation: Any, where: str) -> tuple[type[msgspec.Struct], ...]:
    origin = typing.get_origin(annotation)
    is_union = origin is typing.Union or origin is types.UnionType
    members = typing.get_args(annotation) if is_union else (annotation,)
    found = []
    for member in members:
        if not (isinstance(member, type) and issubclass(member, msgspec.Struct)):
            raise RegistrationError(
                f"{where}: the event parameter is annotated {annotation!r}; annotate it with an event class "
                "(a msgspec.Struct subclass) or a Union of them, e.g. `async def handle(event: OrderPlaced, ctx)`"
            )
        found.append(member)
    return tuple(found)


class SubscribeOptions(TypedDict, total=False):
    """The options of ``@bus.subscribe``; see :meth:`EventBus.subscribe`."""

    name: str | None
    timeout: float
    max_attempts: int
    backoff: Backoff | float | None
    transactional: bool
    ordered: bool
    concurrency: int


def subscription_for(
    handler: Callable[..., Any],
    *,
    name: str | None = None,
    timeout: float = 30.0,
    max_attempts: int = 5,
    backoff: Backoff | float | None = None,
    transactional: bool = False,
    ordered: bool = False,
    concurrency: int = 1,
    event_types: tuple[type[msgspec.Struct], ...] | None = None,
) -> Subscription:
    """Build a :class:`Subscription` from a handler's signature; raise :class:`RegistrationError` if unusable."""
    where = f"handler {getattr(handler, '__qualname__', handler)!r}"
    if not callable(handler):
        raise RegistrationError(f"{where} is not callable")
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError) as exc:
        raise RegistrationError(f"{where}: cannot read its signature ({exc})") from exc
    if not 1 <= len(params) <= 2:
        raise RegistrationError(f"{where} must take (event) or (event, ctx); it takes {len(params)} parameters")
    if event_types is None:
        try:
            hints = typing.get_type_hints(handler)
        except Exception as exc:
            raise RegistrationError(f"{where}: its annotations do not resolve ({exc})") from exc
        if params[0].name not in hints:
            raise RegistrationError(
                f"{where}: the event parameter {params[0].name!r} has no annotation; "
                "annotate it with the event class, e.g. `event: OrderPlaced`"
            )
        event_types = _event_types(hints[params[0].name], where)
    is_async = inspect.iscoroutinefunction(handler)
    if transactional and not is_async:
        raise RegistrationError(f"{where}: a transactional handler must be `async def` (it awaits ctx.connection)")
    if ordered and not is_async:
        raise RegistrationError(
            f"{where}: an ordered handler must be `async def`: a plain `def` handler that outlives its timeout "
            "keeps running in its thread beside the key's next event, so its order could not be kept"
        )
    if timeout <= 0 or max_attempts < 1 or concurrency < 1:
        raise RegistrationError(f"{where}: timeout must be > 0, max_attempts >= 1 and concurrency >= 1")
    if backoff is None:
        backoff = Backoff()
    elif not isinstance(backoff, Backoff):
        backoff = Backoff(initial=float(backoff))
    return Subscription(
        name=name or f"{handler.__module__}.{handler.__qualname__}",
        handler=handler,
        event_types=event_types,
        timeout=float(timeout),
        max_attempts=max_attempts,
        backoff=backoff,
        transactional=transactional,
        ordered=ordered,
        concurrency=concurrency,
        is_async=is_async,
        takes_context=len(params) == 2,
    )


class Verdict(Enum):
    DONE = "done"
    DUPLICATE = "duplicate"  # an identical redelivery, skipped
    RETRY = "retry"
    DEAD = "dead"
    #: Not run: the relay lost the row's key partition before the delivery started; the share goes back to pending
    #: (the settle that says so is fenced: it writes nothing unless the relay owns the partition again).
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    delay: float = 0.0
    reason: Reason | None = None
    error_type: str | None = None
    error: str | None = None
    attempts: int = 0
    #: When the attempt failed (``anyio.current_time()``): a retry's backoff runs from here.
    failed_at: float = 0.0
    #: A dead letter's formatted traceback (capped, redacted) and the trace its attempt ran in.
    traceback: str | None = None
    trace_id: str | None = None


DONE = Outcome(Verdict.DONE)
DUPLICATE = Outcome(Verdict.DUPLICATE)
REVOKED = Outcome(Verdict.REVOKED)


#: Errors eventbus raises when a handler uses it wrongly (``ctx.connection`` outside a transactional subscriber):
#: dead-lettered at once, since every attempt would fail alike.
_USAGE_ERRORS = (ConfigurationError, RegistrationError, NotInTransaction)


def _cancelling() -> bool:
    """Whether cancellation of the current task was requested (a stop, or a scope around it), as opposed to a
    cancellation error the task merely met (a future another task cancelled)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def payload_hash(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


@dataclass(slots=True)
class AttemptRunner:
    """Runs attempts of handlers against one database (for transactional subscribers) and one registry."""

    registry: Registry
    publisher: Publisher
    transaction: Callable[[], AbstractAsyncContextManager[Any]]  # a pooled connection in a transaction
    inbox: InboxRepository
    redact: Callable[[str], str] | None = None
    #: Where plain ``def`` handlers run (daemon threads, a bounded pool per subscriber).
    threads: ThreadPools = field(default_factory=ThreadPools)
    #: The consumer spans, and the counters and durations of attempts.
    tracing: Tracing = field(default_factory=Tracing)
    metrics: Metrics = field(default_factory=Metrics.of)

    async def run(self, sub: Subscription, envelope: Envelope, attempt: int) -> Outcome:
        """One attempt of ``sub`` on ``envelope``: its outcome, never an exception, except the cancellation of
        the task running it (a stop). A cancellation the handler met elsewhere (a future cancelled by other code)
        is a failed attempt like any other exception."""
        try:
            event = self.registry.decode(envelope.topic, envelope.payload)
        except (DeserializationError, UnknownTopic) as exc:
            unknown = isinstance(exc, UnknownTopic)
            outcome = Outcome(
                Verdict.DEAD, reason=Reason.HANDLER_MISSING if unknown else Reason.DESERIALIZATION_FAILED,
                error_type=type(exc).__name__, error=cap_error(str(exc), self.redact), attempts=attempt,
                trace_id=trace_id_of(envelope.headers),
            )  # fmt: skip
            self._dead(sub, envelope, outcome)
            return outcome
        started = time.perf_counter() if self.metrics.enabled else None
        with self.tracing.process(sub.name, envelope.topic, envelope.event_id, envelope.headers, attempt) as span:
            try:
                if sub.transactional:
                    outcome = await self._transactional(sub, envelope, event, attempt)
                else:
                    await self._call(sub, event, Context(envelope, sub.name, attempt, self.publisher))
                    outcome = DONE
            except Exception as exc:
                outcome = self._failure(sub, envelope, exc, attempt, span)
            except anyio.get_cancelled_exc_class() as exc:
                if _cancelling():
                    raise  # this task is being cancelled: the relay stops
                outcome = self._failure(sub, envelope, exc, attempt, span)
        with contextlib.suppress(Exception):  # a failing metrics SDK costs the figure, not the outcome
            self.metrics.processed(
                sub.name, envelope.topic, envelope.tenant, _outcome_label(outcome),
                None if started is None else time.perf_counter() - started, outcome.error_type,
            )  # fmt: skip
        return outcome

    def _dead(self, sub: Subscription, envelope: Envelope, outcome: Outcome) -> None:
        assert outcome.reason is not None
        logs.dead_lettered(
            envelope, sub.name, outcome.reason, outcome.error_type, outcome.error, outcome.attempts,
            traceback=outcome.traceback, trace_id=outcome.trace_id,
        )  # fmt: skip

    async def exhausted(self, sub: Subscription, envelope: Envelope, how: str) -> Outcome:
        """The outcome of a row delivered more often than its subscriber's ``max_attempts`` without an attempt
        finishing (``how``: what kept ending them): handled, when a transactional subscriber's inbox shows its
        effect committed, else an ``AttemptsExhausted`` dead letter (logged)."""
        try:
            if await self.handled_before(sub, envelope):
                return DUPLICATE  # handled, and its effect committed: settled as handled, not dead-lettered
        except Exception:
            pass  # cannot tell: the inbox still keeps the effect once if the letter is replayed
        outcome = Outcome(
            Verdict.DEAD, reason=Reason.DELIVERY_FAILED, error_type="AttemptsExhausted",
            error=f"delivered {envelope.attempts} times, more than max_attempts={sub.max_attempts}: earlier "
            f"attempts never finished ({how})", attempts=envelope.attempts,
        )  # fmt: skip
        self._dead(sub, envelope, outcome)
        return outcome

    async def handled_before(self, sub: Subscription, envelope: Envelope) -> bool:
        """Whether a transactional subscriber's inbox records this event: its effect committed, though the
        attempt that made it was never settled (its relay died, or its lease ran out)."""
        if not sub.transactional:
            return False
        async with self.transaction() as conn:
            return await self.inbox.seen(conn, sub.name, envelope.event_id)

    async def _transactional(self, sub: Subscription, envelope: Envelope, event: Any, attempt: int) -> Outcome:
        digest = payload_hash(envelope.payload)
        async with self.transaction() as conn:
            first, seen = await self.inbox.enter(conn, sub.name, envelope.event_id, digest, envelope.tenant)
            if not first:
                if seen is None or seen == digest:
                    return DUPLICATE
                trace_id = current_trace_id(trace.get_current_span()) or trace_id_of(envelope.headers)
                outcome = Outcome(
                    Verdict.DEAD, reason=Reason.DUPLICATE_EVENT, error_type="DuplicateEvent",
                    error=f"event {envelope.event_id} was already processed by {sub.name} with a different payload",
                    attempts=attempt, trace_id=trace_id,
                )  # fmt: skip
                self._dead(sub, envelope, outcome)
                return outcome
            await self._call(sub, event, Context(envelope, sub.name, attempt, self.publisher, conn))
        return DONE

    async def _call(self, sub: Subscription, event: Any, ctx: Context) -> None:
        args = (event, ctx) if sub.takes_context else (event,)
        # A bare deadline scope: the same as anyio.fail_after, and cheaper on this per-attempt path.
        with anyio.CancelScope(deadline=anyio.current_time() + sub.timeout) as scope:
            if sub.is_async:
                await sub.handler(*args)
            else:
                # A thread cannot be interrupted: on timeout it is abandoned and finishes on its own.
                await self.threads.run(sub.name, sub.concurrency, sub.handler, *args)
        if scope.cancelled_caught:
            raise TimeoutError

    def _failure(
        self, sub: Subscription, envelope: Envelope, exc: BaseException, attempt: int, span: Any
    ) -> Outcome:
        """The outcome of an attempt that raised ``exc``, logged (a WARNING when it is retried, an ERROR with the
        traceback when it is dead-lettered) and marked on its span."""
        timed_out = isinstance(exc, TimeoutError)
        text = f"handler exceeded its timeout of {sub.timeout:g} s" if timed_out else _describe(exc)
        error_type = type(exc).__name__
        trace_id = current_trace_id(span) or trace_id_of(envelope.headers)
        usage = isinstance(exc, _USAGE_ERRORS)
        if usage:
            # eventbus refused what the handler asked of it: another attempt would be refused alike.
            text = f"{text} (a usage error: not retried)"
        error = cap_error(text, self.redact)
        with contextlib.suppress(Exception):
            failed(span, error_type, error)
        if attempt < sub.max_attempts and not usage:
            delay = sub.backoff.delay(attempt)
            logs.attempt_failed(envelope, sub.name, attempt, sub.max_attempts, error_type, error, delay,
                                trace_id=trace_id)  # fmt: skip
            return Outcome(Verdict.RETRY, delay=delay, error=error, error_type=error_type,
                           failed_at=anyio.current_time())  # fmt: skip
        outcome = Outcome(
            Verdict.DEAD,
            reason=Reason.HANDLER_TIMEOUT if timed_out and not usage else Reason.DELIVERY_FAILED,
            error_type=error_type,
            error=error,
            attempts=attempt,
            traceback=logs.format_traceback(exc, self.redact),
            trace_id=trace_id,
        )
        self._dead(sub, envelope, outcome)
        return outcome


def _describe(exc: BaseException) -> str:
    """``Type: message``, also for an exception whose ``__str__`` itself fails."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__}: (its message could not be read)"


def _outcome_label(outcome: Outcome) -> str:
    """What ``eventbus.handler.attempts`` and ``messaging.process.duration`` call an attempt's outcome."""
    if outcome is DONE or outcome.verdict is Verdict.DONE:
        return "ok"
    if outcome.verdict is Verdict.DUPLICATE:
        return "duplicate"
    return "timeout" if outcome.error_type == "TimeoutError" else "failed"
