"""The facade users touch: ``EventBus`` wires the repositories, the relay, the transport and the subscribers
together; it holds no SQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, Unpack, overload

import anyio
import asyncpg
import msgspec

from ._connections import transactional_connection
from ._driver import connecting, translate
from ._embedded import embedded_dsn
from ._pool import bus_connection, create_pool
from ._typing import Connection
from .errors import ConfigurationError, DatabaseUnavailable, RegistrationError
from .events import EventFields, Registry
from .handlers import AttemptRunner, PublishOptions, SubscribeOptions, Subscription, subscription_for
from .migrations import Partitioning, check_migrations, migrate
from .observability.http import serve_http
from .observability.metrics import Metrics
from .observability.tracing import Tracing
from .relay import Relay, RelayConfig, RelayStatistics
from .repositories import (
    DeadLetterRepository,
    InboxRepository,
    NewEvent,
    OfferResult,
    OutboxRepository,
    RelayRepository,
    SubscriptionRepository,
)
from .sql import quote_schema
from .transports import DeliveryStatistics, Transport, Unrouted
from .transports.local import LocalTransport

__all__ = ["BusStatistics", "EventBus", "Health", "Transaction"]

log = logging.getLogger("eventbus.bus")

#: Connections of the relay's own pool: its claims, up to three settling statements, lease renewals and
#: heartbeats, and retention.
_RELAY_CONNECTIONS = 6

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Health:
    """What :meth:`EventBus.health` found: ``alive`` (``/healthz``), ``ready`` (``/readyz``) and each check."""

    alive: bool
    ready: bool
    checks: dict[str, str]


def _prometheus_metrics(provider: Any) -> tuple[Metrics, Any]:
    """The metrics of a bus serving ``/metrics``: on a meter provider of its own with a Prometheus reader on a
    registry of its own, unless the application gave or installed an SDK provider (then ``/metrics`` serves
    prometheus_client's default registry, where a Prometheus reader of that provider writes)."""
    try:
        from prometheus_client import CollectorRegistry

        if provider is not None or Metrics.of().enabled:
            return Metrics.of(provider), None
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
    except ImportError as exc:
        raise ConfigurationError(
            f"metrics_port needs the OpenTelemetry SDK and its Prometheus exporter ({exc.name} is missing): "
            "pip install 'eventbus[otel]'"
        ) from exc
    registry = CollectorRegistry()
    own = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    return Metrics.of(own), registry


@dataclass(frozen=True, slots=True)
class BusStatistics:
    """Counters since the bus started (this process only)."""

    delivered: int
    failed: int
    retried: int
    dead_lettered: int
    duplicates_skipped: int
    dropped: int
    relay: RelayStatistics | None
    #: Relay wake-ups carried by COMMIT messages, and sent by the bus's waker when no COMMIT came to carry one.
    wake_ups_carried: int = 0
    wake_ups_sent: int = 0
    #: Threads of plain ``def`` handlers left running past their timeout (each finishes on its own).
    abandoned_threads: int = 0


def _closed(conn: Connection) -> bool:
    """Whether a pooled connection is closed (a connection that died is detached from its pool proxy: closed)."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


def _raise_if_unavailable(exc: Exception) -> None:
    """Raise :class:`DatabaseUnavailable` from ``exc`` when ``exc`` says the database cannot be reached."""
    error = translate(exc)
    if isinstance(error, DatabaseUnavailable):
        raise error from exc


def _seconds(delay: float | timedelta | None) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if seconds < 0:
        raise ValueError(f"delay must not be negative (got {seconds} s)")
    return seconds


class Transaction:
    """An open database transaction from :meth:`EventBus.transaction`; events published on it commit with it."""

    def __init__(self, bus: EventBus, connection: Connection, tenant: str | None = None) -> None:
        self.bus = bus
        self.connection = connection
        #: The tenant its events are published for unless one says otherwise (the bus's, unless given).
        self.tenant = bus.tenant if tenant is None else tenant

    def _options(self, options: PublishOptions) -> PublishOptions:
        if options.get("tenant") is None:
            options["tenant"] = self.tenant
        return options

    async def publish(self, event: msgspec.Struct, **options: Unpack[PublishOptions]) -> uuid.UUID | None:
        """Offer ``event`` in this transaction (options: :class:`PublishOptions`); return its id, or None when
        its ``idempotency_key`` was used before."""
        return await self.bus._publish_one(event, self.connection, self._options(options))

    async def publish_many(
        self, events: Sequence[msgspec.Struct], **options: Unpack[PublishOptions]
    ) -> OfferResult:
        """Offer several events with the same options in this transaction, in one round trip.

        For options that differ per event (keys, idempotency keys), encode each with :meth:`EventBus.encode`
        and :meth:`offer` them.
        """
        if options.get("idempotency_key") is not None:
            raise ConfigurationError(
                "an idempotency key names one event: encode each event with its own (bus.encode(event, "
                "idempotency_key=...)) and pass them to tx.offer(...)"
            )
        encode, options = self.bus.encode, self._options(options)
        return await self.bus.outbox.offer(self.connection, [encode(event, **options) for event in events])

    async def offer(self, events: Sequence[NewEvent]) -> OfferResult:
        """Offer already-encoded events (see :meth:`EventBus.encode`) in this transaction, in one round trip."""
        return await self.bus.outbox.offer(self.connection, events)


class EventBus:
    """Publish typed events inside your PostgreSQL transaction; deliver them after commit.

    ``dsn``: a PostgreSQL URL. Without one, ``EVENTBUS_DSN`` is used, else an embedded PostgreSQL server is
    started in ``data_dir`` (default ``.eventbus`` in the current directory, or ``EVENTBUS_DATA_DIR``).
    ``schema`` holds eventbus's tables; ``migrate`` applies missing migrations on start (else start fails
    with a message saying how to apply them); with ``partitioning`` (``"daily"`` or ``"hourly"``), that migration
    also converts the outbox to the partitioned layout (see :func:`eventbus.migrations.migrate`; the default,
    None, leaves the layout as it is). ``transport`` hands claimed events to the subscribers: ``"local"``
    (the default) runs them in this process. ``notify=False`` sends no wake-up at commit: relays then find new
    events by polling (``RelayConfig.poll_interval``). It saves the wake-up: for :meth:`transaction`, a short
    transaction after the COMMIT, at most one per ``wake_spacing`` seconds in a started bus (see
    :mod:`eventbus._waker`); for :meth:`publish` on your connection, a NOTIFY inside your transaction (a
    notifying commit, which PostgreSQL serialises across the database). BENCHMARKS.md gives what each costs.
    ``wake_spacing=0`` wakes relays after every transaction. ``init_connection`` is awaited with every new
    connection of the bus's pools, the relay's own included (register type codecs, add query loggers).

    Observability (see docs/observability.md): spans and metrics go to ``tracer_provider`` and
    ``meter_provider`` (default: OpenTelemetry's global ones; without an SDK they are no-ops). ``metrics_port``
    serves ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz`` on ``metrics_host``; without a meter provider
    of the SDK it makes one of its own for ``/metrics`` (the ``otel`` extra).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "eventbus",
        tenant: str = "",
        data_dir: str | os.PathLike[str] | None = None,
        migrate: bool = True,
        partitioning: Partitioning | None = None,
        pool_size: int = 10,
        registry: Registry | None = None,
        relay: bool | None = None,
        relay_config: RelayConfig | None = None,
        transport: Transport | Literal["local"] = "local",
        unrouted: Unrouted = "dead_letter",
        redact: Callable[[str], str] | None = None,
        stop_timeout: float = 10.0,
        notify: bool = True,
        wake_spacing: float = 0.002,
        init_connection: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
        meter_provider: Any = None,
        tracer_provider: Any = None,
    ) -> None:
        if unrouted not in ("dead_letter", "drop"):
            raise ConfigurationError(f"unrouted must be 'dead_letter' or 'drop', not {unrouted!r}")
        if not wake_spacing >= 0:
            raise ConfigurationError(
                f"wake_spacing must be 0 or more seconds, not {wake_spacing!r} (0 wakes relays after every transaction)"
            )
        quote_schema(schema)  # fail at construction, not at start
        if metrics_port is not None and not 0 <= metrics_port <= 65535:
            raise ConfigurationError(
                f"metrics_port must be a TCP port (0 to 65535; 0 picks a free one), not {metrics_port!r}"
            )
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self._meter_provider = meter_provider
        self.tracing = Tracing(tracer_provider, redact=redact)
        self.metrics = Metrics.of(meter_provider)
        self._prometheus: Any = None  # the Prometheus registry /metrics serves
        self._database_checked: tuple[float, str] = (-math.inf, "")  # when health() last asked, and the answer
        #: The address /metrics, /healthz and /readyz are served on, once started (with ``metrics_port=0``: the
        #: port picked).
        self.metrics_address: tuple[str, int] | None = None
        self._dsn = dsn
        self._schema = schema
        self.tenant = tenant
        self.data_dir = data_dir
        self.migrate = migrate
        self.partitioning: Partitioning | None = partitioning
        self.pool_size = pool_size
        self.init_connection = init_connection
        self.registry = registry or Registry()
        self._pool: asyncpg.Pool | None = None
        self._outbox: OutboxRepository | None = None
        self._dead_letters: DeadLetterRepository | None = None
        self._relays: RelayRepository | None = None
        self._subscribers: SubscriptionRepository | None = None
        self.run_relay = relay
        self.relay_config = relay_config or RelayConfig()
        self.unrouted: Unrouted = unrouted
        self.redact = redact
        self.stop_timeout = stop_timeout
        self.notify = notify
        self.wake_spacing = wake_spacing
        self.subscriptions: dict[str, Subscription] = {}
        if transport == "local":
            transport = LocalTransport()
        elif isinstance(transport, str):
            raise ConfigurationError(f"transport must be 'local' or a Transport instance, not {transport!r}")
        self.transport: Transport = transport
        self._relay: Relay | None = None
        self._delivering = False
        self._serving: asyncio.Task[None] | None = None  # the background work, between start() and stop()
        self._runner: AttemptRunner | None = None
        self._relay_pool: asyncpg.Pool | None = None
        self._stopping = anyio.Event()
        self._stop_timeout = stop_timeout

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding eventbus's tables."""
        return self._schema

    @schema.setter
    def schema(self, value: str) -> None:
        self._not_connected("schema")
        quote_schema(value)
        self._schema = value

    @property
    def dsn(self) -> str | None:
        """The DSN given (or set before connecting), else None: see :meth:`resolve_dsn` for the one in use."""
        return self._dsn

    @dsn.setter
    def dsn(self, value: str | None) -> None:
        self._not_connected("dsn")
        self._dsn = value

    def _not_connected(self, setting: str) -> None:
        if self._pool is not None:
            raise ConfigurationError(f"cannot change {setting} of a connected bus; set it before connecting")

    # -- subscribing -----------------------------------------------------------------------------------------

    @overload
    def subscribe(self, handler: F, /) -> F: ...

    @overload
    def subscribe(self, handler: None = None, /, **options: Unpack[SubscribeOptions]) -> Callable[[F], F]: ...

    def subscribe(self, handler: F | None = None, /, **options: Unpack[SubscribeOptions]) -> Any:
        """Register a handler, as ``@bus.subscribe`` or ``@bus.subscribe(timeout=5, ...)``.

        The handler is ``async def handler(event: SomeEvent, ctx: Context)``; the annotation picks the events
        (a Union subscribes to several). ``name`` (default: the handler's module and qualified name) keys its
        retries, inbox rows and dead letters. ``timeout`` (seconds, default 30) bounds each attempt; after
        ``max_attempts`` (default 5) a failure is
        dead-lettered. ``transactional`` runs the handler in a transaction with its inbox row (exactly one
        effect per event); ``ordered`` handles each key's events one at a time in ``event_id`` order;
        ``concurrency`` is the number of events handled at once; ``backoff`` (a :class:`Backoff`, or the
        first delay in seconds) spaces retries. Plain ``def`` handlers run on daemon threads, at most twice
        ``concurrency`` per subscriber; one that outlives its timeout is abandoned (it finishes on its own, and
        :meth:`statistics` counts it). An ordered handler must be ``async def``.
        """

        def register(fn: F) -> F:
            if self._serving is not None:
                raise RegistrationError("subscribe handlers before the bus starts")
            sub = subscription_for(fn, **options)
            if sub.name in self.subscriptions:
                raise RegistrationError(
                    f"a subscriber named {sub.name!r} exists already; give one of them another name= "
                    "(the name keys retries, the inbox and dead letters, so keep it stable)"
                )
            self.registry.register_all(sub.event_types)
            self.subscriptions[sub.name] = sub
            return fn

        return register(handler) if handler is not None else register

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def resolve_dsn(self) -> str:
        """The DSN in use: the one given, else ``EVENTBUS_DSN``, else the embedded server's."""
        if self._dsn is None:
            self._dsn = os.environ.get("EVENTBUS_DSN") or await embedded_dsn(
                None if self.data_dir is None else Path(self.data_dir)
            )
        return self._dsn

    async def connect(self) -> None:
        """Open the connection pool and check (or apply) migrations. Idempotent."""
        if self._pool is not None:
            return
        if self.metrics_port is not None and self._prometheus is None:
            self.metrics, self._prometheus = _prometheus_metrics(self._meter_provider)
        dsn = await self.resolve_dsn()
        with connecting(dsn):
            pool = await create_pool(dsn, max_size=self.pool_size, init=self.init_connection, tenant=self.tenant)
        try:
            async with pool.acquire() as conn:
                if self.migrate:
                    await migrate(conn, self.schema, partitioning=self.partitioning)
                else:
                    await check_migrations(conn, self.schema)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._outbox = OutboxRepository(
            pool, self.schema, notify=self.notify, wake_spacing=self.wake_spacing, metrics=self.metrics
        )
        self._dead_letters = DeadLetterRepository(self._outbox)
        self._relays = RelayRepository(pool, self.schema)
        self._subscribers = SubscriptionRepository(pool, self.schema)

    async def start(self) -> None:
        """Connect, then start the relay and the subscriber actors (when this bus has subscribers or
        ``relay=True``) and the sender of relay wake-ups (when ``notify``). They run in a task of their own until
        :meth:`stop`, which may be called from another task (a web framework's shutdown hook) and under any
        cancel scope; ``async with bus:`` does both."""
        await self.connect()
        wants_relay = self.run_relay if self.run_relay is not None else bool(self.subscriptions)
        if not (wants_relay or self.notify or self.metrics_port is not None) or self._serving is not None:
            return
        ready = anyio.Event()
        self._stopping = anyio.Event()
        self._serving = asyncio.get_running_loop().create_task(self._serve(wants_relay, ready))
        try:
            await ready.wait()
        except BaseException:
            await self._stop_tasks(0)  # start() was cancelled: take down what it started
            raise
        if self._serving.done():  # it failed while starting: raise why, and leave the bus as it was
            try:
                await self._stop_tasks(0)
            finally:
                await self.close()

    async def _serve(self, wants_relay: bool, ready: anyio.Event) -> None:
        """The bus's background work, in a task of its own: the wake-up sender and the relay, until stopped."""
        try:
            async with anyio.create_task_group() as task_group:
                if self.metrics_port is not None:  # first: a port in use fails the start, before a relay claims
                    self.metrics_address = await task_group.start(
                        serve_http, self.metrics_host, self.metrics_port, self._metrics_text, self.health
                    )
                if self.notify:
                    await task_group.start(self.outbox.waker.run, await self.resolve_dsn())
                if wants_relay:
                    runner = AttemptRunner(
                        registry=self.registry, publisher=self, transaction=self._connection_in_transaction,
                        inbox=InboxRepository(self.schema), redact=self.redact, tracing=self.tracing,
                        metrics=self.metrics,
                    )  # fmt: skip
                    self.transport.attach(
                        list(self.subscriptions.values()), runner, unrouted=self.unrouted, schema=self.schema,
                        lease=self.relay_config.lease,
                    )
                    self._runner = runner
                    self._delivering = True
                    # The relay's statements (claim, settle, renew, heartbeat) run on connections of its own: the
                    # producers and transactional handlers that share the bus's pool cannot starve its leases.
                    relay_pool = await create_pool(
                        await self.resolve_dsn(), max_size=_RELAY_CONNECTIONS, init=self.init_connection,
                        tenant=self.tenant, jit=False, custom_plans=await self.outbox.partitioned(),
                    )  # fmt: skip
                    self._relay_pool = relay_pool
                    outbox = OutboxRepository(relay_pool, self.schema, notify=False, metrics=self.metrics)
                    self._relay = Relay(
                        outbox, RelayRepository(relay_pool, self.schema), self.transport, await self.resolve_dsn(),
                        self.relay_config, dead_letters=DeadLetterRepository(outbox),
                        subscriptions=SubscriptionRepository(relay_pool, self.schema), metrics=self.metrics,
                    )  # fmt: skip
                    await task_group.start(self._relay.run)
                ready.set()
                await self._stopping.wait()
                relay, waker = self._relay, self.outbox.waker if self.notify else None
                if relay is not None:
                    relay.stop()
                    with anyio.move_on_after(self._stop_timeout):
                        await relay.wait_stopped()
                if waker is not None:
                    waker.stop()
                    with anyio.move_on_after(self._stop_timeout):
                        await waker.wait_stopped()
                if self._runner is not None:
                    self._runner.threads.close()
                task_group.cancel_scope.cancel()
        except Exception as exc:
            log.exception("the bus's background work (relay, wake-ups) failed; stop() raises the error")
            if isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                raise exc.exceptions[0] from None  # what failed, not the task group around it
            raise
        finally:
            self.metrics_address = None
            if self._relay_pool is not None:
                relay_pool, self._relay_pool = self._relay_pool, None
                with anyio.CancelScope(shield=True):
                    with anyio.move_on_after(5.0) as closing:
                        await relay_pool.close()
                    if closing.cancelled_caught:
                        relay_pool.terminate()
            ready.set()  # last: start() then finds this task done when it failed

    async def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let handlers finish within ``timeout`` seconds (default ``stop_timeout``), then cancel
        what is left (its rows go back to pending), send the last relay wake-up and close the pool. Raises what
        the background work failed with, if it failed."""
        try:
            await self._stop_tasks(self.stop_timeout if timeout is None else timeout)
        finally:
            await self.close()

    async def _stop_tasks(self, timeout: float) -> None:
        serving, self._serving = self._serving, None
        if serving is None:
            return
        self._stop_timeout = timeout
        self._stopping.set()
        # Shielded: a caller being cancelled still gets a bus that stopped (within the timeout, then at once).
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(timeout + 5.0):
                await asyncio.wait((serving,))
            if not serving.done():
                serving.cancel()
                await asyncio.wait((serving,))
        error = None if serving.cancelled() else serving.exception()
        if error is not None:
            raise error

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def drain(self, timeout: float = 30.0, *, poll_interval: float = 0.02) -> None:
        """Wait until every committed event is handled or dead-lettered (no row pending or claimed), looking every
        ``poll_interval`` seconds.

        Raises ``TimeoutError`` saying how many rows are left after ``timeout`` seconds. A connection lost
        meanwhile is replaced and the wait goes on.
        """
        left = 0
        with anyio.move_on_after(timeout):
            while True:
                try:
                    left = await self.outbox.unsettled()
                except Exception as exc:
                    if not isinstance(translate(exc), DatabaseUnavailable):
                        raise
                    await anyio.sleep(0.05)
                    continue
                if left == 0:
                    return
                if self._relay is not None:
                    self._relay.wake()
                await anyio.sleep(poll_interval)
        raise TimeoutError(
            f"{left} events were still pending or claimed after {timeout:g} s; is a relay running "
            "(`async with bus:` with subscribers, or `eventbus relay`)? Delayed retries count as pending, and so do "
            "rows waiting for a paused subscriber or for one no live relay carries (see `eventbus subscribers`)"
        )

    def statistics(self) -> BusStatistics:
        counters = self.transport.statistics() if self._delivering else DeliveryStatistics()
        return BusStatistics(
            delivered=counters.delivered,
            failed=counters.failed,
            retried=counters.retried,
            dead_lettered=counters.dead_lettered,
            duplicates_skipped=counters.duplicates_skipped,
            dropped=counters.dropped,
            relay=self._relay.statistics() if self._relay is not None else None,
            wake_ups_carried=self._outbox.waker.carried if self._outbox is not None else 0,
            wake_ups_sent=self._outbox.waker.sent if self._outbox is not None else 0,
            abandoned_threads=self._runner.threads.abandoned if self._runner is not None else 0,
        )

    @property
    def relay(self) -> Relay | None:
        return self._relay

    @asynccontextmanager
    async def consumer(self, subscribers: Sequence[str] | None = None) -> AsyncIterator[Any]:
        """Run this bus's subscribers (or those named) on the events its broker transport forwards, until the
        block ends: ``async with bus.consumer(): ...``. The bus's transport must be a broker transport
        (``EventBus(transport=NatsTransport(...))``); the relay forwarding to it runs elsewhere (``eventbus
        relay``) or in this process. Several consumer processes share the work. At the end, handlers that run get
        ``stop_timeout`` to finish; what has not finished is delivered again."""
        make = getattr(self.transport, "consumer", None)
        if make is None:
            raise ConfigurationError(
                "bus.consumer() needs a broker transport: EventBus(transport=NatsTransport('nats://...')); with the "
                "local transport the relay runs the subscribers itself (`async with bus:`)"
            )
        chosen = list(self.subscriptions.values())
        if subscribers is not None:
            unknown = sorted(set(subscribers) - set(self.subscriptions))
            if unknown:
                raise ConfigurationError(
                    f"no subscribers named {', '.join(unknown)}; this bus has {', '.join(sorted(self.subscriptions))}"
                )
            chosen = [self.subscriptions[name] for name in subscribers]
        await self.connect()
        runner = AttemptRunner(
            registry=self.registry, publisher=self, transaction=self._connection_in_transaction,
            inbox=InboxRepository(self.schema), redact=self.redact, tracing=self.tracing, metrics=self.metrics,
        )  # fmt: skip
        consumer = make(chosen, runner, self.dead_letters, schema=self.schema, stop_timeout=self.stop_timeout,
                        states=self.subscribers)  # fmt: skip
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(consumer.run)
                try:
                    yield consumer
                finally:
                    consumer.close()
                    with anyio.CancelScope(shield=True), anyio.move_on_after(self.stop_timeout + 5):
                        await consumer.wait_stopped()
                    runner.threads.close()
                    tg.cancel_scope.cancel()
        except ExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None  # what failed, not the task group around it
            raise

    async def health(self) -> Health:
        """What ``/healthz`` and ``/readyz`` answer: alive unless the background work failed; ready when the
        database answers within 2 s and, with a relay, it claims and renews its partition leases on time."""
        checks: dict[str, str] = {}
        now = anyio.current_time()
        if now - self._database_checked[0] >= 1.0:  # probes come often: the database is asked once a second
            try:
                with anyio.fail_after(2.0):
                    await self.outbox.ping()
                self._database_checked = (now, "ok")
            except Exception as exc:
                self._database_checked = (now, f"unreachable ({type(exc).__name__})")
        checks["database"] = self._database_checked[1]
        ready = checks["database"] == "ok"
        if self._relay is not None:
            for name, (ok, detail) in self._relay.health().items():
                ready = ready and ok
                checks[name] = detail
        failure = self.failure
        if failure is not None:
            checks["background"] = f"failed ({type(failure).__name__})"
        return Health(alive=failure is None, ready=ready and failure is None, checks=checks)

    def _metrics_text(self) -> bytes:
        """The Prometheus exposition of the bus's meter provider (or of prometheus_client's default registry,
        where a reader of the application's own provider writes)."""
        from prometheus_client import REGISTRY, generate_latest

        return bytes(generate_latest(self._prometheus if self._prometheus is not None else REGISTRY))

    @property
    def failure(self) -> BaseException | None:
        """What the bus's background work (relay, wake-ups) failed with, if it failed while running (it is also
        logged at once, and :meth:`stop` raises it); None while it runs or after a clean stop. A health check
        reads this."""
        serving = self._serving
        if serving is None or not serving.done() or serving.cancelled():
            return None
        return serving.exception()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise ConfigurationError("the bus is not started: use `async with bus:` or `await bus.connect()`")
        return self._pool

    @property
    def outbox(self) -> OutboxRepository:
        self.pool  # noqa: B018 - raises with a clear message when not started
        assert self._outbox is not None
        return self._outbox

    @property
    def dead_letters(self) -> DeadLetterRepository:
        self.pool  # noqa: B018
        assert self._dead_letters is not None
        return self._dead_letters

    @property
    def relays(self) -> RelayRepository:
        """The relays registered on this schema (heartbeats) and their partitions."""
        self.pool  # noqa: B018
        assert self._relays is not None
        return self._relays

    @property
    def subscribers(self) -> SubscriptionRepository:
        """The subscribers the relays on this schema registered: list, pause, resume, retire them."""
        self.pool  # noqa: B018
        assert self._subscribers is not None
        return self._subscribers

    # -- publishing ------------------------------------------------------------------------------------------

    def encode(
        self,
        event: msgspec.Struct,
        *,
        key: str | None = None,
        delay: float | timedelta | None = None,
        idempotency_key: str | None = None,
        headers: dict[str, str] | None = None,
        tenant: str | None = None,
        target: str | None = None,
    ) -> NewEvent:
        """Turn an event into the row an offer inserts (topic, payload, trace context); see
        :meth:`Transaction.offer`. With tracing on, a PRODUCER span of the event's own carries the context."""
        carried = dict(headers) if headers else {}
        topic = self._topic(event)
        with self.tracing.publish(topic, carried):
            return self._encode(event, topic, key, delay, idempotency_key, carried, tenant, target)

    def _topic(self, event: msgspec.Struct) -> str:
        if isinstance(event, EventFields):
            raise ConfigurationError(
                f"{type(event).__name__} is encoded already: offer it with tx.offer([...]), not publish or encode"
            )
        return self.registry.topic_for(event)

    def _encode(
        self,
        event: msgspec.Struct,
        topic: str,
        key: str | None,
        delay: float | timedelta | None,
        idempotency_key: str | None,
        headers: dict[str, str],
        tenant: str | None,
        target: str | None,
    ) -> NewEvent:
        """The row for ``event``, its ``headers`` (the trace context in them already) as given."""
        return NewEvent(
            topic=topic,
            payload=self.registry.encode(event),
            key=key,
            target=target,
            tenant=self.tenant if tenant is None else tenant,
            headers=headers,
            delay=_seconds(delay),
            idempotency_key=idempotency_key,
        )

    async def _publish_one(
        self, event: msgspec.Struct, connection: Connection, options: PublishOptions
    ) -> uuid.UUID | None:
        """Encode and offer one event on ``connection`` inside its PRODUCER span (the span covers the insert)."""
        carried = dict(options.get("headers") or {})
        topic = self._topic(event)
        with self.tracing.publish(topic, carried):
            new = self._encode(
                event, topic, options.get("key"), options.get("delay"), options.get("idempotency_key"), carried,
                options.get("tenant"), options.get("target"),
            )  # fmt: skip
            return (await self.outbox.offer(connection, [new])).ids[0]

    @asynccontextmanager
    async def transaction(self, *, tenant: str | None = None) -> AsyncIterator[Transaction]:
        """A transaction on a pooled connection: commits on normal exit, rolls back on an exception.

        ``tenant`` (default: the bus's) is what its events are published for and what the database's row-level
        security sees for its statements (``eventbus.tenant``); it is set with the BEGIN, in the same round
        trip, and ends with the transaction: the pooled connection goes back with the bus's tenant.

        The COMMIT, the pool's connection reset and the relay wake-up travel in one round trip. A connection that
        is lost (before or at the COMMIT) raises :class:`DatabaseUnavailable`, with the driver's error as its cause:
        the transaction did not commit, unless the loss came at the COMMIT itself (then it may have; publish with
        an ``idempotency_key`` to retry safely). Your own exceptions, and statements the server refused, pass
        through as they are.
        """
        async with self._connection_in_transaction(tenant) as conn:
            yield Transaction(self, conn, tenant)

    @asynccontextmanager
    async def _connection_in_transaction(self, tenant: str | None = None) -> AsyncIterator[Connection]:
        """A pooled connection in a transaction (what :meth:`transaction` wraps). A connection that is lost, or
        cannot be had, raises :class:`DatabaseUnavailable` with the driver's error as its cause; an error of the
        caller's own code, or a statement the server refused, passes through as it is."""
        try:
            acquiring = self.pool.acquire()
            conn = await acquiring.__aenter__()
        except Exception as exc:
            _raise_if_unavailable(exc)
            raise
        try:
            folded = bus_connection(conn)
            assert folded is not None, "the bus's pool makes BusConnections"
            folded.open_fold()
            if tenant is not None and tenant != self.tenant:
                folded.begin_as(tenant)
            try:
                async with conn.transaction():
                    yield conn
                    folded.ready_to_commit()
                folded.committed()
            except Exception as exc:
                if _closed(conn):
                    _raise_if_unavailable(exc)
                raise
            finally:
                # A connection that died is detached from its pool proxy already: the error that ended the
                # transaction is what the caller sees, not this.
                with contextlib.suppress(AttributeError):
                    folded.close_fold()
        finally:
            await acquiring.__aexit__(None, None, None)

    async def publish(
        self, event: msgspec.Struct, *, connection: Any, **options: Unpack[PublishOptions]
    ) -> uuid.UUID | None:
        """Offer ``event`` in the caller's open transaction on ``connection`` (options: :class:`PublishOptions`).

        ``connection``: an asyncpg connection, or a SQLAlchemy ``AsyncConnection``/``AsyncSession`` on asyncpg.
        Returns the row id, or None when ``idempotency_key`` was already used (nothing was inserted).
        Raises :class:`NotInTransaction` when the connection has no open transaction.
        """
        return await self._publish_one(event, await transactional_connection(connection), options)

    async def offer(self, events: Sequence[NewEvent], *, connection: Any) -> OfferResult:
        """Offer already-encoded events (see :meth:`encode`) in the caller's open transaction on ``connection``,
        as :meth:`publish` does."""
        return await self.outbox.offer(await transactional_connection(connection), events)

    async def offer_follow_up(self, events: Sequence[NewEvent], connection: Connection | None) -> OfferResult:
        """Offer a handler's follow-up events: on its transaction (a transactional subscriber's ``connection``),
        else in a transaction of the bus's own."""
        if connection is None:
            async with self.transaction() as tx:
                return await tx.offer(events)
        return await self.outbox.offer(connection, events)
