"""The NATS JetStream transport (``pip install 'eventbus[nats]'``): the relay forwards claimed rows to a stream,
and consumer processes, on this machine or others, run the subscribers' handlers.

Relay side (:class:`NatsTransport`): every claimed row is published to the stream ``EVENTBUS_<SCHEMA>`` on the
subject ``eventbus.<schema>.<partition>.<topic>`` (``u`` for rows without a key), with ``Nats-Msg-Id`` = the
outbox row id, so a row the relay publishes twice (its lease ran out before it settled) is stored once, while a
retry or replay, a new row, is never swallowed by the duplicate window. The event id, key, target, tenant,
attempt and the row's headers (the trace context among them) travel as headers. Publishes are pipelined, at most
``max_in_flight`` awaiting their acknowledgement; a row is settled as relayed once its PubAck arrived. While the
broker cannot be reached, claims hold every subscriber's rows back (they stay pending) and a failed publish
sends its row back to pending with backoff.

The stream keeps messages by age (``max_age``, limits retention), not by interest: interest retention drops a
message published before a subscriber's consumer exists, and a subscriber deployed after its events were
published must still get them.

Consumer side (:class:`NatsConsumer`, through ``bus.consumer()`` or ``eventbus consume``): a durable pull
consumer per subscriber, shared by every consumer process. Each message runs the same attempt pipeline as the
local transport (typed decode, timeout, the inbox of a transactional subscriber); a failure is retried with the
subscriber's backoff through ``nak(delay)``; ``in_progress()`` keeps a long attempt's message; a dead letter is
written to the shared PostgreSQL table, then the message is terminated. An ordered subscriber has one consumer
per key partition, each with one message in flight at a time: a key's events are handled one at a time in the
order the relay published them (event id order), and a key that retries holds up its partition's other keys.

Each durable consumer keeps pull requests waiting on the server for as many messages as it has room for, so a
message is handed over the moment the stream has it (:class:`_Flow`). A paused subscriber's consumers request
nothing more; its lag is read from the broker (``eventbus.subscriber.lag`` with ``messaging.system`` ``nats``).

Known limit: after a publish that failed while later rows of its partition were already in flight, those later
rows can precede it in the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import re
import ssl
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import anyio
import msgspec
from anyio.abc import TaskStatus

from ..errors import ConfigurationError
from ..events import Envelope, partition_of
from ..handlers import DONE, AttemptRunner, Outcome, Subscription, Verdict
from ..observability import logs
from ..repositories import Carried, DeadLetterRepository, Reason, Settlement, Status, SubscriptionRepository
from . import DeliveryStatistics, Report, Unrouted, unrouted_settlement

if TYPE_CHECKING:
    import nats.aio.client
    import nats.aio.msg
    import nats.js

__all__ = ["NatsConsumer", "NatsTransport", "redact_nats_url", "stream_name", "subject_of"]

log = logging.getLogger("eventbus.nats")

#: Deliveries of a message beyond its subscriber's ``max_attempts`` that still run (as its last attempt): a
#: delivery whose acknowledgement was lost (a connection that dropped, a server that restarted) is delivered
#: again without having failed. Past these, the message's consumers kept dying on it: ``AttemptsExhausted``.
REDELIVERY_SLACK = 3

#: Headers eventbus sets; the row's own headers travel beside them.
_EVENT_ID, _KEY, _TARGET, _TENANT, _TOPIC, _ATTEMPT = (
    "Eventbus-Event-Id", "Eventbus-Key", "Eventbus-Target", "Eventbus-Tenant", "Eventbus-Topic", "Eventbus-Attempt",
)  # fmt: skip
_OURS = {_EVENT_ID, _KEY, _TARGET, _TENANT, _TOPIC, _ATTEMPT, "Nats-Msg-Id"}
_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII without ':' or a space
# Credentials before the last "@" of a server address, with or without a scheme (nats-py takes both).
_URL_USER = re.compile(r"(?P<scheme>\b(?:nats|tls|ws|wss)://)?(?P<user>[^\s,/]+)@(?=[^\s,@/]+)")


def redact_nats_url(text: str) -> str:
    """``text`` with the credentials of every NATS URL in it hidden: ``nats://user:***@host``, and a token
    (``nats://TOKEN@host``) as ``nats://***@host``."""

    def hide(match: re.Match[str]) -> str:
        user = match["user"]
        shown = user.split(":", 1)[0] + ":***" if ":" in user else "***"
        return f"{match['scheme'] or ''}{shown}@"

    return _URL_USER.sub(hide, text)


def stream_name(schema: str) -> str:
    """The stream of a schema's events."""
    return f"EVENTBUS_{schema.upper()}"


def _subject_root(schema: str) -> str:
    return f"eventbus.{schema}"


def subject_of(schema: str, topic: str, key: str | None) -> str:
    """``eventbus.<schema>.<partition>.<topic>``: the partition of the key (``u`` without one), then the topic's
    dotted parts, each with the characters a subject token cannot hold replaced by ``_``."""
    return _subject(schema, topic, partition_of(key))


@functools.lru_cache(maxsize=8192)
def _subject(schema: str, topic: str, partition: int | None) -> str:
    tokens = [_TOKEN.sub("_", part) or "_" for part in topic.split(".")]
    return ".".join((_subject_root(schema), "u" if partition is None else str(partition), *tokens))


def _durable(schema: str, subscriber: str, suffix: str = "") -> str:
    """A durable consumer's name for a subscriber: its name's usable characters and a hash of the whole name (two
    names that differ only in unusable characters get their own)."""
    digest = hashlib.blake2b(subscriber.encode(), digest_size=4).hexdigest()
    return f"eventbus_{schema}_{_TOKEN.sub('_', subscriber)[:80]}_{digest}{suffix}"


def _import_nats() -> Any:
    try:
        import nats
    except ImportError as exc:
        raise ConfigurationError("the NATS transport needs nats-py: pip install 'eventbus[nats]'") from exc
    return nats


class _Connection:
    """How to reach the NATS servers, and the connection made with it."""

    def __init__(
        self, servers: str | Sequence[str], *, credentials: str | None, nkeys_seed: str | None,
        tls: ssl.SSLContext | None, user: str | None, password: str | None, token: str | None, name: str,
    ) -> None:  # fmt: skip
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers:
            raise ConfigurationError("give the NATS transport at least one server URL, e.g. nats://127.0.0.1:4222")
        self.options: dict[str, Any] = {"name": name}
        for option, value in (("user_credentials", credentials), ("nkeys_seed", nkeys_seed), ("tls", tls),
                              ("user", user), ("password", password), ("token", token)):  # fmt: skip
            if value is not None:
                self.options[option] = value
        #: When (anyio clock) the broker stopped answering; None while it answers.
        self.unreachable_since: float | None = None
        #: How many times the connection came back, and an event set when it does.
        self.generation = 0
        self.changed = anyio.Event()
        #: Called when the connection is lost (the relay fails what it has in flight at once).
        self.on_loss: Callable[[], None] | None = None
        self.client: nats.aio.client.Client | None = None

    def shown(self) -> str:
        return ", ".join(redact_nats_url(server) for server in self.servers)

    async def open(self) -> nats.aio.client.Client:
        client_module = _import_nats()

        async def disconnected() -> None:
            if self.unreachable_since is None and self.client is not None:  # not our own close()
                self.unreachable_since = anyio.current_time()
                log.warning("NATS connection to %s lost; reconnecting", self.shown())
                if self.on_loss is not None:
                    self.on_loss()

        async def reconnected() -> None:
            self.unreachable_since = None
            self.generation += 1  # pull requests are made again (one can stop receiving after a restart)
            self.changed.set()
            self.changed = anyio.Event()
            logs.emit(log, logging.INFO, "NATS connection to %s back", self.shown(), fields={})

        async def error(exc: Exception) -> None:
            if self.client is None and self.unreachable_since is None:  # connecting: nats-py keeps trying
                self.unreachable_since = anyio.current_time()
            log.debug("NATS client error: %s", redact_nats_url(str(exc)))

        client: nats.aio.client.Client = await client_module.connect(
            servers=self.servers, max_reconnect_attempts=-1, reconnect_time_wait=0.25, connect_timeout=2,
            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error, allow_reconnect=True,
            **self.options,
        )  # fmt: skip
        self.client = client
        self.unreachable_since = None
        return client

    async def close(self) -> None:
        """Close at once: what is in flight was waited for (the relay) or is sent again by the broker (a consumer's
        unacknowledged messages). A drain would wait on the pull subscriptions' queues, which never empty."""
        client, self.client = self.client, None
        if client is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5), contextlib.suppress(Exception):
                await client.close()


async def _ensure_stream(js: nats.js.JetStreamContext, schema: str, max_age: float, duplicate_window: float) -> None:
    """Create the schema's stream, or check the one there: its subjects, limits retention and a duplicate window
    of at least ``duplicate_window``."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    name = stream_name(schema)
    subjects = [f"{_subject_root(schema)}.>"]
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        await js.add_stream(StreamConfig(
            name=name, subjects=subjects, retention=RetentionPolicy.LIMITS, max_age=max_age,
            duplicate_window=duplicate_window, storage=StorageType.FILE,
        ))  # fmt: skip
        logs.emit(log, logging.INFO, "created stream %s for %s", name, subjects[0], fields={"stream": name})
        return
    config = info.config
    if config.retention not in (None, RetentionPolicy.LIMITS):
        raise ConfigurationError(
            f"stream {name} has {config.retention} retention; eventbus needs limits retention (interest retention "
            "drops events published before a subscriber's consumer exists): delete or recreate the stream"
        )
    if (config.duplicate_window or 0) + 1e-9 < duplicate_window:
        raise ConfigurationError(
            f"stream {name}'s duplicate window is {config.duplicate_window:g} s, under the {duplicate_window:g} s "
            "a row may take to be published again (the lease plus the retry horizon): raise it with "
            f"`nats stream edit {name} --dupe-window {math.ceil(duplicate_window)}s`"
        )


async def _ensure_consumer(js: nats.js.JetStreamContext, stream: str, config: Any) -> None:
    from nats.js.errors import NotFoundError

    try:
        await js.consumer_info(stream, config.durable_name)
    except NotFoundError:
        await js.add_consumer(stream, config)


#: How often a consumer reads whether its subscribers are paused.
STATE_INTERVAL = 1.0

#: How long a pull request waits on the server, and how often the server says that it still waits.
PULL_EXPIRES, PULL_HEARTBEAT = 5.0, 1.0


class _Flow:
    """A durable consumer's pull requests, kept outstanding on the server for as many messages as there is room
    for: a message is handed over the moment the stream has it, with no round trip of its own (a ``fetch`` per
    batch waits for the batch or its timeout, and holds what came meanwhile).

    ``held``: messages received and not yet settled, at most ``limit`` with ``credit``, the messages requested
    that have neither come nor been given up by the server (a 408 or 409 status says how many a request left).
    """

    def __init__(
        self, client: nats.aio.client.Client, stream: str, durable: str, limit: int, batch: int,
        held_back: Callable[[], bool] = lambda: False,
    ) -> None:  # fmt: skip
        self.client, self.limit, self.batch, self.held_back = client, limit, max(1, batch), held_back
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = client.new_inbox()
        self.credit = self.held = 0
        self.heard = anyio.current_time()
        self.gone: str | None = None
        self.stopped = False

    async def top_up(self) -> None:
        """Request more once half the room is free (or all of it is), so requests are few and never run dry."""
        room = self.limit - self.held - self.credit
        if self.stopped or room <= 0 or (self.credit and room * 2 < self.limit) or self.held_back():
            return
        wanted = min(room, self.batch)
        if not self.credit:
            self.heard = anyio.current_time()  # the heartbeats are counted from the first request
        self.credit += wanted
        request = {"batch": wanted, "expires": int(PULL_EXPIRES * 1e9), "idle_heartbeat": int(PULL_HEARTBEAT * 1e9)}
        try:
            await self.client.publish(self.next_subject, msgspec.json.encode(request), reply=self.inbox)
        except Exception as exc:  # the connection closed: the pull loop makes the requests again
            self.credit -= wanted
            self.gone = f"a pull request could not be sent: {type(exc).__name__}"

    def arrived(self) -> bool:
        """A message came: False once the flow was replaced (the message comes again, after the ack wait)."""
        self.heard = anyio.current_time()
        self.credit = max(0, self.credit - 1)
        if self.stopped:
            return False
        self.held += 1
        return True

    def status(self, headers: dict[str, str]) -> None:
        self.heard = anyio.current_time()
        code = headers.get("Status", "")
        if code in ("404", "408", "409"):  # a request ended, with this many of its messages not sent
            self.credit = max(0, self.credit - int(headers.get("Nats-Pending-Messages") or self.credit))
        if code == "409":  # the consumer was deleted, a leader changed, too many requests wait: start again
            self.gone = headers.get("Description") or "409"

    def check(self) -> None:
        """Raise when the requests must be made again: the server said they are gone, or sent nothing for three
        heartbeats while one should wait (an orphaned request)."""
        if self.gone is not None:
            raise ConnectionError(f"the server ended the pull requests: {self.gone}")
        if self.credit and anyio.current_time() - self.heard > 3 * PULL_HEARTBEAT:
            raise ConnectionError("no heartbeat from the server for a waiting pull request")


def _backoff(failures: int, most: float = 5.0) -> float:
    return min(most, 0.1 * 2.0 ** min(failures, 10))


class NatsTransport:
    """The relay's side: forwards claimed rows to the schema's JetStream stream (see the module's documentation).

    ``servers``: one URL or several (``nats://``, ``tls://``); credentials through ``credentials`` (a ``.creds``
    file), ``nkeys_seed`` (an NKEY seed file), ``user``/``password``, ``token`` or the URL itself, and ``tls`` (an
    :class:`ssl.SSLContext`). No password or token is ever printed. ``max_age``: how long the stream keeps a
    message; ``duplicate_window``: at least the relay's lease plus the time a failed publish takes to come back
    (checked on a stream that exists); ``max_in_flight``: publishes awaiting their acknowledgement;
    ``ack_timeout``: how long a publish waits for it before its row goes back to pending. Consumers: ``ack_wait``
    is how long a message handed to a consumer that died waits before another gets it (a running attempt renews
    it with ``in_progress()``); ``fetch_batch`` how many messages one pull request asks for at most (a consumer
    holds at most twice a subscriber's concurrency); ``metrics_interval`` how often, while an SDK meter provider is
    in use, a consumer reads its subscribers' lag from the broker.
    """

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        credentials: str | None = None,
        nkeys_seed: str | None = None,
        tls: ssl.SSLContext | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        max_age: timedelta = timedelta(days=7),
        duplicate_window: float = 120.0,
        max_in_flight: int = 1024,
        ack_timeout: float = 10.0,
        ack_wait: float = 10.0,
        fetch_batch: int = 64,
        metrics_interval: float = 5.0,
    ) -> None:
        if max_in_flight < 1 or ack_timeout <= 0 or duplicate_window <= 0 or ack_wait < 1:
            raise ConfigurationError(
                "max_in_flight must be at least 1, ack_timeout and duplicate_window above 0, ack_wait at least 1 s"
            )
        #: How the connection authenticates and encrypts (credentials, nkeys_seed, tls, user, password, token).
        self.settings: dict[str, Any] = {
            "credentials": credentials, "nkeys_seed": nkeys_seed, "tls": tls, "user": user, "password": password,
            "token": token,
        }  # fmt: skip
        self.servers = servers
        self.max_age = max_age.total_seconds()
        self.duplicate_window = duplicate_window
        self.max_in_flight = max_in_flight
        self.ack_timeout = ack_timeout
        self.ack_wait = ack_wait
        self.fetch_batch = fetch_batch
        self.metrics_interval = metrics_interval
        self.schema = "eventbus"
        self.unrouted: Unrouted = "dead_letter"
        self.subscriptions: list[Subscription] = []
        self.counters: Counter[str] = Counter()
        self._topics: set[str] = set()
        self._names: set[str] = set()
        self._connection: _Connection | None = None
        self._js: nats.js.JetStreamContext | None = None
        self._in_flight = 0
        self._closing = anyio.Event()
        self._idle = anyio.Event()
        #: Publishes awaiting their acknowledgement, oldest first, with when they give up waiting.
        self._awaiting: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._lost = False  # the connection was lost with publishes in flight

    def connection(self, name: str) -> _Connection:
        """A new connection setting of this transport's servers and credentials."""
        return _Connection(self.servers, name=name, **self.settings)

    # -- the Transport protocol ------------------------------------------------------------------------------

    def attach(
        self, subscriptions: Sequence[Subscription], runner: AttemptRunner, *, unrouted: Unrouted,
        schema: str = "eventbus", lease: float = 30.0,
    ) -> None:  # fmt: skip
        # A row can be published again once its lease ran out, or once a failed publish comes back: the stream
        # must still know its message id then.
        horizon = lease + self.ack_timeout + 1.0
        if self.duplicate_window <= horizon:
            raise ConfigurationError(
                f"the NATS stream's duplicate window ({self.duplicate_window:g} s) must exceed the relay's lease plus "
                f"the publish retry horizon ({lease:g} + {self.ack_timeout:g} + 1 s): raise "
                f"NatsTransport(duplicate_window=...) above {horizon:g} s, or shorten RelayConfig(lease=...)"
            )
        self.subscriptions = list(subscriptions)
        self.unrouted = unrouted
        self.schema = schema
        self._topics = {topic for sub in subscriptions for topic in sub.topics}
        self._names = {sub.name for sub in subscriptions}
        self.counters.clear()
        self._closing = anyio.Event()

    def statistics(self) -> DeliveryStatistics:
        return DeliveryStatistics(**{k: v for k, v in self.counters.items() if k in DeliveryStatistics.__slots__})

    def carried(self) -> list[Carried]:
        """Every subscriber of the application: its consumers get the events this relay forwards."""
        return [Carried(sub.name, sub.topics, sub.ordered) for sub in self.subscriptions]

    def unreachable_for(self) -> float | None:
        """How long the broker has not answered (since the connection was lost, or since the first failed
        attempt to connect); None while connected."""
        connection = self._connection
        since = None if connection is None else connection.unreachable_since
        return None if since is None else anyio.current_time() - since

    def _reachable(self) -> bool:
        """Connected, and not still waiting for the publishes a lost connection took with it (rows claimed later
        must not reach the stream before those come back)."""
        if self._lost:
            if self._in_flight:
                return False
            self._lost = False
        return self._js is not None and self._connection is not None and self._connection.unreachable_since is None

    def _connection_lost(self) -> None:
        """Fail every publish in flight now (their acknowledgements went with the connection), and claim nothing
        until all of them have come back as pending."""
        self._lost = True
        for _, future in self._awaiting:
            future.cancel()

    def full(self) -> list[str]:
        """While the broker cannot be reached, or ``max_in_flight`` publishes wait: every subscriber (their
        targeted rows stay pending)."""
        return sorted(self._names) if not self._reachable() or self._in_flight >= self.max_in_flight else []

    def blocked_topics(self) -> list[str]:
        return sorted(self._topics) if not self._reachable() or self._in_flight >= self.max_in_flight else []

    def make_room(self) -> None:
        """Nothing to let go of: a row leaves the relay's hands when the broker acknowledges it."""

    def revoke(self, partitions: Collection[int]) -> None:
        """Rows already published cannot be taken back; their settles are fenced by the partition's epoch."""

    def hold(self, names: Collection[str]) -> None:
        """A paused subscriber's consumers pause; the relay forwards every event once for all subscribers."""

    def close(self) -> None:
        self._closing.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect (retrying in the background while the broker cannot be reached: rows stay pending meanwhile),
        make sure the stream exists, forward until closed, then wait for the publishes in flight."""
        connection = self._connection = self.connection("eventbus relay")
        connection.on_loss = self._connection_lost
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._connect, connection)
                tg.start_soon(self._watch)
                task_status.started()
                await self._closing.wait()
                with anyio.move_on_after(self.ack_timeout):
                    while self._in_flight:
                        self._idle = anyio.Event()
                        await self._idle.wait()
                tg.cancel_scope.cancel()
        finally:
            self._js = None
            await connection.close()
            self._connection = None

    async def _watch(self) -> None:
        """Give up on publishes without an acknowledgement after ``ack_timeout`` (their rows go back to pending):
        one sweep every quarter second rather than a timer per message."""
        awaiting = self._awaiting
        while True:
            await anyio.sleep(0.25)
            now = asyncio.get_running_loop().time()
            while awaiting and (awaiting[0][1].done() or awaiting[0][0] <= now):
                _, future = awaiting.popleft()
                future.cancel()  # no-op when it is done

    async def _connect(self, connection: _Connection) -> None:
        failures = 0
        while True:
            try:
                client = await connection.open()
                js = client.jetstream(publish_async_max_pending=self.max_in_flight)
                await _ensure_stream(js, self.schema, self.max_age, self.duplicate_window)
                self._js = js
                logs.emit(log, logging.INFO, "relay forwards to NATS stream %s at %s", stream_name(self.schema),
                          connection.shown(), fields={"stream": stream_name(self.schema)})  # fmt: skip
                return
            except ConfigurationError:
                raise
            except Exception as exc:
                failures += 1
                connection.unreachable_since = connection.unreachable_since or anyio.current_time()
                await connection.close()
                delay = _backoff(failures, most=1.0)
                log.warning("cannot reach NATS at %s (%s); rows stay pending, retrying in %.1f s", connection.shown(),
                            redact_nats_url(str(exc) or type(exc).__name__), delay)  # fmt: skip
                await anyio.sleep(delay)

    async def deliver(self, rows: Sequence[Envelope], report: Report) -> None:
        for row in rows:
            if (row.target is None and row.topic not in self._topics) or (
                row.target is not None and row.target not in self._names
            ):
                self.counters["dead_lettered" if self.unrouted == "dead_letter" or row.target else "dropped"] += 1
                report(row, unrouted_settlement(row, self.unrouted, where="the application"), ())
                continue
            js = self._js
            if js is None or not self._reachable():
                self._failed(row, report, "the broker cannot be reached")
                continue
            headers = self._headers(row)
            refused = self._refused(row, headers)
            if refused is not None:
                self.counters["dead_lettered"] += 1
                settlement = Settlement()
                settlement.mark(row, Status.DEAD, error=refused)
                settlement.dead_letter(row, Reason.DELIVERY_FAILED, row.target, error_type="Unforwardable",
                                       error=refused, log_when_written=True)  # fmt: skip
                report(row, settlement, ())
                continue
            try:
                # No wait_stall: it costs a task and a timer per message. claims stop while max_in_flight publishes
                # wait (see full()), so this waits for room only when one claim brought more than there is.
                subject = subject_of(self.schema, row.topic, row.key)
                future = await js.publish_async(subject, row.payload, headers=headers)
            except Exception as exc:
                self._failed(row, report, f"publishing failed: {type(exc).__name__}: {exc}")
                continue
            self._in_flight += 1
            self._awaiting.append((asyncio.get_running_loop().time() + self.ack_timeout, future))
            future.add_done_callback(functools.partial(self._acked, row, report))

    @staticmethod
    def _headers(row: Envelope) -> dict[str, str]:
        headers = dict(row.headers)
        headers["Nats-Msg-Id"] = str(row.id)
        headers[_EVENT_ID] = str(row.event_id)
        headers[_TOPIC] = row.topic
        headers[_ATTEMPT] = str(row.attempts)
        # Percent-encoded: NATS trims header values and turns line breaks into spaces.
        if row.key is not None:
            headers[_KEY] = quote(row.key, safe="")
        if row.target is not None:
            headers[_TARGET] = quote(row.target, safe="")
        if row.tenant:
            headers[_TENANT] = quote(row.tenant, safe="")
        return headers

    def _refused(self, row: Envelope, headers: dict[str, str]) -> str | None:
        """Why the broker would refuse the row's message (a header name it cannot carry, more bytes than the
        server's max_payload), or None. Such a row is dead-lettered: publishing it again would fail alike."""
        bad = [name for name in headers if not _HEADER_NAME.fullmatch(name)]
        if bad:
            return f"header names a NATS message cannot carry: {', '.join(map(repr, bad[:5]))}"
        client = self._connection.client if self._connection is not None else None
        limit = getattr(client, "max_payload", None)
        size = len(row.payload) + 16 + sum(len(k) + len(v) + 4 for k, v in headers.items())
        if isinstance(limit, int) and limit > 0 and size > limit:
            return f"the message would be {size} bytes, over the NATS server's max_payload of {limit}"
        return None

    def _acked(self, row: Envelope, report: Report, done: asyncio.Future[Any]) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()
        if done.cancelled() or done.exception() is not None:
            why = "no acknowledgement within the ack timeout" if done.cancelled() else str(done.exception())
            self._failed(row, report, why)
            return
        self.counters["delivered"] += 1
        report(row, None, ())

    def _failed(self, row: Envelope, report: Report, why: str) -> None:
        """The row goes back to pending, with backoff and its attempt back (nothing ran)."""
        self._lost = True  # later rows of its key may be in flight: claim again once they have all come back
        self.counters["failed"] += 1
        settlement = Settlement()
        # Due at once: claims are held while the broker cannot be reached, and a row due later than its key's next
        # rows would let them overtake it.
        settlement.mark(row, Status.PENDING, delay=0.0, refund=True,
                        error=f"not forwarded to NATS: {redact_nats_url(why)}")  # fmt: skip
        report(row, settlement, ())

    # -- the consumer side -----------------------------------------------------------------------------------

    def consumer(
        self, subscriptions: Sequence[Subscription], runner: AttemptRunner, dead_letters: DeadLetterRepository,
        *, schema: str, stop_timeout: float = 10.0, states: SubscriptionRepository | None = None,
    ) -> NatsConsumer:  # fmt: skip
        """A consumer of this transport's stream for ``subscriptions`` (see :class:`NatsConsumer`)."""
        return NatsConsumer(self, subscriptions, runner, dead_letters, schema=schema, stop_timeout=stop_timeout,
                            states=states)  # fmt: skip


class _Fields(msgspec.Struct, frozen=True):
    """What a message must carry to be an event."""

    event_id: uuid.UUID
    topic: str


class NatsConsumer:
    """Runs subscribers' handlers on the messages of a schema's stream, with the attempt pipeline of the local
    transport (see the module's documentation). Several consumer processes may run for the same subscribers: they
    share each subscriber's durable consumers."""

    def __init__(
        self, transport: NatsTransport, subscriptions: Sequence[Subscription], runner: AttemptRunner,
        dead_letters: DeadLetterRepository, *, schema: str, stop_timeout: float = 10.0,
        states: SubscriptionRepository | None = None,
    ) -> None:  # fmt: skip
        if not subscriptions:
            raise ConfigurationError("a consumer needs subscribers: subscribe handlers on the bus first")
        self.transport, self.runner, self.dead_letters = transport, runner, dead_letters
        self.subscriptions = list(subscriptions)
        self.schema = schema
        self.stop_timeout = stop_timeout
        self.counters: Counter[str] = Counter()
        self._closing = anyio.Event()
        self._stopped = anyio.Event()
        self._running = 0
        #: Messages received and not yet settled, with when they came (see :meth:`_keep`).
        self._in_hand: dict[int, tuple[float, nats.aio.msg.Msg]] = {}
        self._idle = anyio.Event()
        self._connection: _Connection | None = None
        self._states = states
        #: Subscribers paused (``eventbus subscribers pause``): their consumers request no more messages.
        self.paused: set[str] = set()

    def statistics(self) -> DeliveryStatistics:
        return DeliveryStatistics(**{k: v for k, v in self.counters.items() if k in DeliveryStatistics.__slots__})

    def close(self) -> None:
        """Fetch nothing more; what runs finishes (within the stop timeout), then :meth:`run` returns."""
        self._closing.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        transport = self.transport
        connection = self._connection = transport.connection("eventbus consumer")
        try:
            client = await connection.open()
            js = client.jetstream()
            await _ensure_stream(js, self.schema, transport.max_age, transport.duplicate_window)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep)
                tg.start_soon(self._observe_lag, js)
                if self._states is not None:
                    with anyio.move_on_after(5.0):
                        await self._read_states(self._states)
                    tg.start_soon(self._follow_states, self._states)
                for sub in self.subscriptions:
                    for durable, subject, one_at_a_time in self._consumers(sub):
                        tg.start_soon(self._pull, connection, client, js, sub, durable, subject, one_at_a_time)
                names = ", ".join(sub.name for sub in self.subscriptions)
                logs.emit(log, logging.INFO, "consumer of stream %s started for %s", stream_name(self.schema), names,
                          fields={"schema": self.schema})  # fmt: skip
                task_status.started()
                await self._closing.wait()
                with anyio.move_on_after(self.stop_timeout):
                    while self._running:
                        self._idle = anyio.Event()
                        await self._idle.wait()
                tg.cancel_scope.cancel()
        finally:
            await connection.close()
            self._stopped.set()

    async def _follow_states(self, states: SubscriptionRepository) -> None:
        """Every ``STATE_INTERVAL`` seconds, which of the subscribers are paused: their consumers finish what they
        hold and request nothing more until resumed."""
        while True:
            await anyio.sleep(STATE_INTERVAL)
            await self._read_states(states)

    async def _read_states(self, states: SubscriptionRepository) -> None:
        try:
            read = await states.states([sub.name for sub in self.subscriptions])
        except Exception as exc:
            log.debug("consumer: could not read the subscribers' states: %s", exc)
            return
        paused = {name for name, state in read.items() if state == "paused"}
        for name in sorted(paused ^ self.paused):
            logs.emit(log, logging.INFO, "consumer: subscriber %s %s", name,
                      "paused" if name in paused else "resumed", fields={"subscriber": name})  # fmt: skip
        self.paused = paused

    async def _observe_lag(self, js: nats.js.JetStreamContext) -> None:
        """While an SDK meter provider is in use, every ``metrics_interval`` seconds: each subscriber's messages its
        durable consumers have not acknowledged, and the age of the oldest, as ``eventbus.subscriber.pending`` and
        ``eventbus.subscriber.lag`` (with ``messaging.system`` ``nats``)."""
        metrics = self.runner.metrics
        figures = metrics.broker
        try:
            while True:
                if metrics.enabled:
                    for sub in self.subscriptions:
                        try:
                            with anyio.fail_after(5.0):
                                figures[(self.schema, sub.name)] = await self._lag_of(js, sub)
                        except Exception as exc:
                            figures.pop((self.schema, sub.name), None)  # no figure rather than a stale one
                            log.debug("consumer of %s: could not read its lag: %s", sub.name, exc)
                await anyio.sleep(self.transport.metrics_interval)
        finally:
            for sub in self.subscriptions:
                figures.pop((self.schema, sub.name), None)

    async def _lag_of(self, js: nats.js.JetStreamContext, sub: Subscription) -> tuple[int, float]:
        stream = stream_name(self.schema)
        waiting, oldest = 0, 0.0
        for durable, subject, _ in self._consumers(sub):
            info = await js.consumer_info(stream, durable)
            unacknowledged = (info.num_pending or 0) + (info.num_ack_pending or 0)
            if not unacknowledged:
                continue
            waiting += unacknowledged
            floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
            first = await js.get_msg(stream, seq=(floor or 0) + 1, subject=subject, next=True)
            if first.time is not None:
                oldest = max(oldest, (datetime.now(UTC) - first.time).total_seconds())
        return waiting, oldest

    def _consumers(self, sub: Subscription) -> list[tuple[str, str, bool]]:
        """(durable name, filter subject, one message at a time) of a subscriber's consumers."""
        root = _subject_root(self.schema)
        if not sub.ordered:
            return [(_durable(self.schema, sub.name), f"{root}.>", False)]
        from ..events import PARTITIONS

        keyed = [(_durable(self.schema, sub.name, f"_p{p}"), f"{root}.{p}.>", True) for p in range(PARTITIONS)]
        return [(_durable(self.schema, sub.name, "_u"), f"{root}.u.>", False), *keyed]

    async def _pull(
        self, connection: _Connection, client: nats.aio.client.Client, js: nats.js.JetStreamContext,
        sub: Subscription, durable: str, subject: str, one_at_a_time: bool,
    ) -> None:  # fmt: skip
        """Handle one durable consumer's messages as they arrive, until closed. Its pull requests are made again
        after every reconnect (a pull subscription can stop receiving after a server restart), when the server
        says they are gone (a 409 status) or when it stopped saying they wait (no heartbeat: an orphaned
        request)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        # Short, whatever the handler's timeout: a running attempt sends in_progress() every third of it, so only
        # the messages of a consumer that died (or whose connection dropped) wait this long to come back.
        ack_wait = self.transport.ack_wait
        config = ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait, max_deliver=-1, filter_subject=subject,
            max_ack_pending=1 if one_at_a_time else max(1000, sub.concurrency * 4),
        )  # fmt: skip
        slots = anyio.Semaphore(1 if one_at_a_time else sub.concurrency)
        # A message waits for a worker only behind one running attempt per worker: the rest stay in the stream
        # for the subscriber's other consumer processes.
        limit = 1 if one_at_a_time else 2 * sub.concurrency
        stream = stream_name(self.schema)
        failures = 0

        def held_back() -> bool:  # a stop, or a pause: request nothing more
            return self._closing.is_set() or sub.name in self.paused

        async with anyio.create_task_group() as handling:
            while not self._closing.is_set():
                generation, changed = connection.generation, connection.changed
                flow = _Flow(client, stream, durable, limit, self.transport.fetch_batch, held_back=held_back)

                async def arrived(message: nats.aio.msg.Msg, flow: _Flow = flow) -> None:
                    if not message.reply:  # a status of the pull requests, not a message of the stream
                        flow.status(message.headers or {})
                    elif flow.arrived():
                        self._running += 1
                        self._in_hand[id(message)] = (anyio.current_time(), message)
                        handling.start_soon(self._handle_released, sub, message, slots, flow)
                    else:
                        with contextlib.suppress(Exception):
                            await message.nak()  # to the flow that replaced this one
                    await flow.top_up()

                subscription: Any = None
                try:
                    # A JetStream request sent while the connection is down waits for its whole timeout (5 s):
                    # give up sooner and try again, so delivery resumes soon after the broker is back.
                    with anyio.fail_after(1.0):
                        await _ensure_consumer(js, stream, config)
                    subscription = await client.subscribe(flow.inbox, cb=arrived)
                    await flow.top_up()
                    while not self._closing.is_set() and generation == connection.generation:
                        with anyio.move_on_after(PULL_HEARTBEAT):
                            await changed.wait()
                        flow.check()
                        await flow.top_up()  # after a pause
                        failures = 0
                except Exception as exc:
                    if self._closing.is_set():
                        return
                    failures += 1
                    delay = _backoff(failures, most=1.0)  # at most a second: resume soon after the broker is back
                    log.warning("consumer %s: pulling failed (%s: %s); pulling again in %.1f s", durable,
                                type(exc).__name__, redact_nats_url(str(exc)), delay)  # fmt: skip
                    await anyio.sleep(delay)
                finally:
                    flow.stopped = True
                    if subscription is not None:
                        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                            await subscription.unsubscribe()

    async def _handle_released(
        self, sub: Subscription, message: nats.aio.msg.Msg, slots: anyio.Semaphore, flow: _Flow
    ) -> None:
        try:
            async with slots:
                await self._handle(sub, message)
        except Exception:
            log.exception("consumer of %s: a message could not be settled; the broker redelivers it", sub.name)
        finally:
            self._in_hand.pop(id(message), None)
            self._running -= 1
            if not self._running:
                self._idle.set()
            flow.held -= 1
        await flow.top_up()

    async def _handle(self, sub: Subscription, message: nats.aio.msg.Msg) -> None:
        headers = dict(message.headers or {})
        attempt = message.metadata.num_delivered or 1
        try:
            fields = msgspec.convert({"event_id": headers.get(_EVENT_ID), "topic": headers.get(_TOPIC)}, _Fields)
            row_id = uuid.UUID(headers.get("Nats-Msg-Id", str(fields.event_id)))
        except (msgspec.ValidationError, ValueError):
            await self._unreadable(sub, message, headers, attempt)
            return
        key, target = headers.get(_KEY), headers.get(_TARGET)
        envelope = Envelope(
            id=row_id, event_id=fields.event_id, topic=fields.topic, payload=message.data,
            key=None if key is None else unquote(key), target=None if target is None else unquote(target),
            tenant=unquote(headers.get(_TENANT, "")),
            headers={k: v for k, v in headers.items() if k not in _OURS}, attempts=attempt,
        )  # fmt: skip
        if (envelope.target is not None and envelope.target != sub.name) or envelope.topic not in sub.topics:
            await message.ack()  # another subscriber's row, or a topic this one does not take
            return
        if attempt > sub.max_attempts + REDELIVERY_SLACK:
            outcome = await self.runner.exhausted(
                sub, envelope, "a consumer died, or its acknowledgement was lost, while handling"
            )
        else:
            attempt = min(attempt, sub.max_attempts)  # a redelivery past the limit runs as the last attempt
            if self._closing.is_set():
                await message.nak()  # a stop: it is delivered again at once, to another consumer
                return
            try:
                outcome = await self.runner.run(sub, envelope, attempt)
            except anyio.get_cancelled_exc_class():
                # Cut short by a stop past its timeout: delivered again at once, not after the ack wait.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await message.nak()
                raise
        await self._settle(sub, envelope, message, outcome)

    async def _keep(self) -> None:
        """``in_progress()`` for every message held for a third of the ack wait (its attempt runs, or waits for a
        worker), every third of it, so the broker does not hand it to another consumer (one task for all, not one
        per message)."""
        every = self.transport.ack_wait / 3
        while True:
            await anyio.sleep(every)
            due = anyio.current_time() - every
            for started, message in list(self._in_hand.values()):
                if started <= due:
                    with contextlib.suppress(Exception):
                        await message.in_progress()

    async def _settle(self, sub: Subscription, envelope: Envelope, message: nats.aio.msg.Msg, outcome: Outcome) -> None:
        with anyio.CancelScope(shield=True):
            if outcome is DONE or outcome.verdict is Verdict.DONE:
                self.counters["delivered"] += 1
                await message.ack()
            elif outcome.verdict is Verdict.DUPLICATE:
                self.counters["duplicates_skipped"] += 1
                await message.ack()
            elif outcome.verdict is Verdict.RETRY:
                self.counters["failed"] += 1
                self.counters["retried"] += 1
                delay = max(0.0, outcome.failed_at + outcome.delay - anyio.current_time())
                await message.nak(delay=delay)
            else:
                assert outcome.reason is not None
                try:
                    await self.dead_letters.add(
                        envelope, outcome.reason, sub.name, attempts=outcome.attempts or envelope.attempts,
                        error_type=outcome.error_type, error=outcome.error, traceback=outcome.traceback,
                        trace_id=outcome.trace_id,
                    )  # fmt: skip
                except Exception as exc:
                    log.warning("consumer of %s: could not write a dead letter (%s); the message comes back in 1 s",
                                sub.name, exc)  # fmt: skip
                    await message.nak(delay=1.0)
                    return
                self.counters["dead_lettered"] += 1
                await message.term()

    async def _unreadable(
        self, sub: Subscription, message: nats.aio.msg.Msg, headers: dict[str, str], attempt: int
    ) -> None:
        """A message without a readable event id or topic: one ``DeserializationFailed`` letter, then term."""
        # Named by its place in the stream, so a redelivery is recognised and writes no second letter.
        place = message.metadata
        event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"nats:{place.stream}:{place.sequence.stream}")
        envelope = Envelope(id=event_id, event_id=event_id, topic=headers.get(_TOPIC, message.subject),
                            payload=message.data if _is_json(message.data) else b"null", attempts=attempt)  # fmt: skip
        why = f"message on {message.subject} has no readable {_EVENT_ID} or {_TOPIC} header"
        logs.dead_lettered(envelope, sub.name, Reason.DESERIALIZATION_FAILED, "DeserializationError", why, attempt)
        await self.dead_letters.add(envelope, Reason.DESERIALIZATION_FAILED, sub.name, attempts=attempt,
                                    error_type="DeserializationError", error=why)  # fmt: skip
        await message.term()


def _is_json(data: bytes) -> bool:
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError:
        return False
    return True
