"""No handler or row can wedge the bus: stray cancellations, poison rows, usage errors, attempts that ran out
after the effect had committed, recovery after an outage.

Each test is a scenario that broke on 0.2.0 before these fixes: a handler that met a cancelled future ended the
bus with an ``ExceptionGroup``; a targeted row of an unknown topic restarted its worker forever; a row whose
headers were not strings failed every claim that met it and held its batch-mates for a lease; ``ctx.connection``
in a plain handler was retried five times; a schema name of 55-63 characters made every commit look failed; a
row claimed too often was dead-lettered although its transactional effect had committed.
"""

from __future__ import annotations

import asyncio

import anyio
import asyncpg
import msgspec
import pytest

from eventbus import (
    Backoff,
    ConfigurationError,
    Context,
    DatabaseUnavailable,
    EventBus,
    NewEvent,
    RelayConfig,
    Settlement,
    Status,
)
from eventbus.sql import quote_schema

pytestmark = pytest.mark.anyio

GIVE_UP = 30.0
FAST = RelayConfig(poll_interval=0.05, heartbeat_interval=0.2, reclaim_interval=0.2)


class Ping(msgspec.Struct, frozen=True):
    n: int


def relay_bus(dsn: str, schema: str, config: RelayConfig = FAST) -> EventBus:
    return EventBus(dsn, schema=schema, relay_config=config, relay=True)


async def test_a_cancellation_a_handler_meets_is_a_failed_attempt(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = relay_bus(eventbus_dsn, eventbus_schema)
    attempts: list[tuple[int, int]] = []

    @bus.subscribe(name="flaky", backoff=0.01)
    async def handle(event: Ping, ctx: Context) -> None:
        attempts.append((event.n, ctx.attempt))
        if event.n == 0 and ctx.attempt == 1:
            future = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(future.cancel)  # cancelled by someone else
            await future

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish_many([Ping(0), Ping(1)])
        await bus.drain(GIVE_UP)
        assert await bus.dead_letters.count() == {}
    assert sorted(attempts) == [(0, 1), (0, 2), (1, 1)]


async def test_a_targeted_row_of_an_unknown_topic_is_dead_lettered_once(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = relay_bus(eventbus_dsn, eventbus_schema)
    seen: list[int] = []

    @bus.subscribe(name="audit")
    async def handle(event: Ping) -> None:
        seen.append(event.n)

    async with bus:
        async with bus.transaction() as tx:
            await tx.offer([NewEvent(topic="renamed.away", payload=b"{}", target="audit")])
            await tx.publish(Ping(1))
        await bus.drain(GIVE_UP)
        assert await bus.dead_letters.count() == {("HandlerMissing", "audit"): 1}
        (letter,) = await bus.dead_letters.list()
        assert letter.error_type == "HandlerMissing" and "renamed.away" in (letter.error or "")
    assert seen == [1]


async def test_a_row_whose_headers_cannot_be_read_is_dead_lettered_alone(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = relay_bus(eventbus_dsn, eventbus_schema, RelayConfig(poll_interval=0.05, lease=60.0))
    seen: list[int] = []

    @bus.subscribe(name="audit")
    async def handle(event: Ping) -> None:
        seen.append(event.n)

    await bus.connect()
    async with bus.transaction() as tx:
        await tx.publish_many([Ping(n) for n in range(10)])
    await bus.pool.execute(
        f"UPDATE {quote_schema(eventbus_schema)}.eventbus_outbox SET headers = '{{\"retries\": 3}}' "
        "WHERE payload->>'n' = '4'"
    )
    async with bus:
        await bus.drain(GIVE_UP)  # a lease is 60 s: batch-mates held for a lease would not make it
        assert await bus.dead_letters.count() == {("DeserializationFailed", None): 1}
    assert sorted(seen) == [0, 1, 2, 3, 5, 6, 7, 8, 9]


async def test_a_usage_error_is_dead_lettered_without_retries(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = relay_bus(eventbus_dsn, eventbus_schema)
    attempts: list[int] = []

    @bus.subscribe(name="plain", backoff=0.01)
    async def handle(event: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await ctx.connection.execute("SELECT 1")  # not a transactional subscriber

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish(Ping(1))
        await bus.drain(GIVE_UP)
        (letter,) = await bus.dead_letters.list()
    assert attempts == [1]
    assert (letter.reason, letter.error_type, letter.attempts) == ("DeliveryFailed", "ConfigurationError", 1)


def test_a_schema_name_whose_channel_would_not_fit_is_refused_at_construction() -> None:
    EventBus("postgresql://localhost/x", schema="s" * 54)
    with pytest.raises(ConfigurationError, match="63-byte"):
        EventBus("postgresql://localhost/x", schema="s" * 55)


async def test_attempts_that_ran_out_after_the_effect_committed_settle_as_handled(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """A row claimed more than max_attempts times (its relays died after the commit) is checked against the
    inbox: handled, not an AttemptsExhausted dead letter."""
    bus = relay_bus(eventbus_dsn, eventbus_schema)
    effects: list[int] = []

    @bus.subscribe(name="tx", transactional=True, max_attempts=2)
    async def handle(event: Ping, ctx: Context) -> None:
        effects.append(event.n)

    await bus.connect()
    async with bus.transaction() as tx:
        await tx.publish_many([Ping(1), Ping(2)])
    # Both rows were claimed and handled twice by relays that died before settling; the first row's effect
    # committed (its inbox row is there), the second's never did.
    (first, second) = await bus.outbox.claim(10, 30.0, "dead-relay")
    async with bus.transaction() as tx:
        await tx.connection.execute(
            f"INSERT INTO {quote_schema(eventbus_schema)}.eventbus_inbox (subscriber, event_id, payload_hash) "
            "VALUES ('tx', $1, '\\x00')",
            first.event_id,
        )
    released = Settlement()
    for row in (first, second):
        released.mark(row, Status.PENDING)
    await bus.outbox.settle("dead-relay", released)
    await bus.pool.execute(f"UPDATE {quote_schema(eventbus_schema)}.eventbus_outbox SET attempts = 2")
    async with bus:
        await bus.drain(GIVE_UP)
        letters = await bus.dead_letters.list()
    assert effects == []
    assert [(letter.event_id, letter.error_type) for letter in letters] == [(second.event_id, "AttemptsExhausted")]


async def test_a_relay_backing_off_after_failed_claims_wakes_on_a_notification(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """After claims failed, a notification cuts the backoff short (0.2.0 before: it slept up to 5 s)."""
    bus = relay_bus(eventbus_dsn, eventbus_schema, RelayConfig(poll_interval=60.0))
    handled = anyio.Event()

    @bus.subscribe(name="audit")
    async def handle(event: Ping) -> None:
        handled.set()

    async with bus:
        relay = bus.relay
        assert relay is not None
        failing = relay.outbox.claim

        async def refused(*args: object, **kwargs: object) -> object:
            relay.outbox.claim = failing  # type: ignore[method-assign]
            raise ConnectionResetError("the database went away")

        relay.outbox.claim = refused  # type: ignore[method-assign]
        relay.wake()
        await anyio.sleep(0.2)  # the claim failed; the relay backs off (up to its 60 s poll interval)
        async with bus.transaction() as tx:
            await tx.publish(Ping(1))
        # Before, the relay slept min(poll interval, 5 s) after a failed claim, deaf to notifications.
        with anyio.fail_after(3):
            await handled.wait()


async def test_leases_are_renewed_while_handlers_hold_every_pooled_connection(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """The relay renews its leases on connections of its own: transactional handlers that hold the bus's whole
    pool (of one connection) for longer than a lease do not let their rows expire, to be run again by another
    relay (0.2.0 before: the renewal waited for the pool, and the other relay ran both events again)."""
    config = RelayConfig(poll_interval=0.05, heartbeat_interval=0.2, reclaim_interval=0.2, lease=1.0)
    attempts: list[tuple[str, int, int]] = []

    def relay(name: str) -> EventBus:
        bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=config, relay=True, pool_size=1)

        @bus.subscribe(name="slow", transactional=True, timeout=10)
        async def handle(event: Ping, ctx: Context) -> None:
            attempts.append((name, event.n, ctx.attempt))
            await ctx.connection.execute("SELECT pg_sleep(2)")  # two leases

        return bus

    first, second = relay("first"), relay("second")
    async with first:
        async with first.transaction() as tx:
            await tx.publish_many([Ping(1), Ping(2)])
        with anyio.fail_after(GIVE_UP):
            while not attempts:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        async with second:  # a relay with connections to spare, reclaiming what expires
            await first.drain(GIVE_UP)
    assert sorted(attempts) == [("first", 1, 1), ("first", 2, 1)], "each ran once: no lease ran out under it"


async def test_a_transaction_whose_connection_dies_raises_database_unavailable(bus: EventBus) -> None:
    """The caller's retry logic sees eventbus's connection error, the driver's error as its cause (0.2.0 before:
    the asyncpg error itself, or an AttributeError from the pool's bookkeeping)."""
    with pytest.raises(DatabaseUnavailable) as caught:
        async with bus.transaction() as tx:
            await tx.publish(Ping(1))
            async with bus.pool.acquire() as other:
                await other.execute("SELECT pg_terminate_backend($1)", tx.connection.get_server_pid())
            await tx.publish(Ping(2))
    assert isinstance(caught.value.__cause__, asyncpg.PostgresError | asyncpg.InterfaceError | ConnectionError)
    assert await bus.outbox.unsettled() == 0, "nothing of it committed"


async def test_a_retry_comes_due_without_waiting_for_the_poll(eventbus_dsn: str, eventbus_schema: str) -> None:
    """A retry row is delayed, so no notification announces it: the relay wakes when it comes due (before: at
    the next poll, here a minute away)."""
    bus = relay_bus(eventbus_dsn, eventbus_schema, RelayConfig(poll_interval=60.0))
    attempts: list[int] = []
    retried = anyio.Event()

    @bus.subscribe(name="flaky", backoff=Backoff(initial=0.2, jitter=0))
    async def handle(event: Ping, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("fails once")
        retried.set()

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish(Ping(1))
        with anyio.fail_after(20):  # a third of the poll interval
            await retried.wait()
    assert attempts == [1, 2]
