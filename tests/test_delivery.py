"""README-level delivery behaviour of EventBus against a real PostgreSQL: typed handlers, their Context,
registration errors, timeouts, retries, dead-letter reasons, the inbox, ctx.publish, ordering and drain()."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import anyio
import msgspec
import pytest

from eventbus import (
    Backoff,
    ConfigurationError,
    Context,
    DeadLetter,
    DeadLetterFilter,
    EventBus,
    LocalTransport,
    NewEvent,
    Reason,
    RegistrationError,
    RelayConfig,
    Status,
)

pytestmark = pytest.mark.anyio

FAST = RelayConfig(poll_interval=0.05, lease=2, reclaim_interval=0.2, heartbeat_interval=0.2)
QUICK = Backoff(initial=0.01, jitter=0)
DRAIN = 60.0  # generous: the machine is small and shared


class OrderPlaced(msgspec.Struct, frozen=True):
    order_id: str
    total_cents: int


class OrderShipped(msgspec.Struct, frozen=True):
    order_id: str


class Audited(msgspec.Struct, frozen=True):
    what: str


class Sequenced(msgspec.Struct, frozen=True):
    key: str
    n: int


def make_bus(dsn: str, schema: str, **kwargs: Any) -> EventBus:
    return EventBus(dsn, schema=schema, relay_config=FAST, **kwargs)


async def letters(bus: EventBus, **where: Any) -> list[DeadLetter]:
    return await bus.dead_letters.list(DeadLetterFilter(**where), limit=1000)


async def create_effects(bus: EventBus) -> str:
    table = f'"{bus.schema}".effects'
    await bus.pool.execute(f"CREATE TABLE {table} (event_id uuid NOT NULL, note text)")
    return table


# -- handlers, context, registration ------------------------------------------------------------------------


async def test_handler_receives_typed_event_and_context(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    seen: list[tuple[Any, dict[str, Any]]] = []

    @bus.subscribe(name="record")
    async def record(event: OrderPlaced, ctx: Context) -> None:
        seen.append((event, {
            "event_id": ctx.event_id, "topic": ctx.topic, "key": ctx.key, "attempt": ctx.attempt,
            "headers": dict(ctx.headers), "subscriber": ctx.subscriber,
        }))  # fmt: skip

    async with bus:
        async with bus.transaction() as tx:
            row_id = await tx.publish(OrderPlaced("o-1", 1299), key="o-1", headers={"correlation_id": "c-42"})
        await bus.drain(DRAIN)

    assert row_id is not None
    assert len(seen) == 1
    event, ctx = seen[0]
    assert type(event) is OrderPlaced and event == OrderPlaced("o-1", 1299)
    assert ctx["event_id"] == row_id  # a first offer's event_id is its row id
    assert ctx["topic"] == "OrderPlaced"
    assert ctx["key"] == "o-1"
    assert ctx["attempt"] == 1
    assert ctx["headers"]["correlation_id"] == "c-42"
    assert ctx["subscriber"] == "record"
    assert bus.statistics().delivered == 1


async def test_union_annotation_subscribes_to_both_topics(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    seen: list[tuple[str, msgspec.Struct]] = []

    @bus.subscribe(name="orders")
    async def orders(event: OrderPlaced | OrderShipped, ctx: Context) -> None:
        seen.append((ctx.topic, event))

    assert set(bus.subscriptions["orders"].topics) == {"OrderPlaced", "OrderShipped"}
    async with bus:
        async with bus.transaction() as tx:
            await tx.publish(OrderPlaced("o-1", 5))
            await tx.publish(OrderShipped("o-1"))
            await tx.publish(Audited("not for orders"))
        await bus.drain(DRAIN)

    assert sorted(seen, key=lambda s: s[0]) == [
        ("OrderPlaced", OrderPlaced("o-1", 5)),
        ("OrderShipped", OrderShipped("o-1")),
    ]


def test_registration_errors_explain_the_fix() -> None:
    bus = EventBus("postgresql://unused@127.0.0.1:1/none")

    async def no_annotation(event, ctx: Context) -> None:  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(RegistrationError, match="no annotation"):
        bus.subscribe(no_annotation)

    async def not_a_struct(event: dict, ctx: Context) -> None:  # type: ignore[type-arg]
        pass

    with pytest.raises(RegistrationError, match=r"msgspec\.Struct"):
        bus.subscribe(not_a_struct)

    async def union_with_a_non_struct(event: OrderPlaced | int, ctx: Context) -> None:
        pass

    with pytest.raises(RegistrationError, match=r"msgspec\.Struct"):
        bus.subscribe(union_with_a_non_struct)

    async def first(event: OrderPlaced) -> None:
        pass

    async def second(event: OrderShipped) -> None:
        pass

    bus.subscribe(first, name="same")
    with pytest.raises(RegistrationError, match="'same' exists already"):
        bus.subscribe(second, name="same")

    def sync_transactional(event: OrderPlaced, ctx: Context) -> None:
        pass

    with pytest.raises(RegistrationError, match="must be `async def`"):
        bus.subscribe(sync_transactional, transactional=True)

    # Only the one valid registration took effect.
    assert list(bus.subscriptions) == ["same"]
    assert bus.subscriptions["same"].handler is first


async def test_plain_def_handler_runs_in_a_thread(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    seen: list[tuple[str, int]] = []
    only_event: list[OrderPlaced] = []

    @bus.subscribe(name="sync_with_ctx")
    def sync_with_ctx(event: OrderPlaced, ctx: Context) -> None:
        seen.append((event.order_id, ctx.attempt))

    @bus.subscribe(name="sync_event_only")
    def sync_event_only(event: OrderPlaced) -> None:
        only_event.append(event)

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish(OrderPlaced("o-7", 7))
        await bus.drain(DRAIN)
        dead = await letters(bus)

    assert seen == [("o-7", 1)]
    assert only_event == [OrderPlaced("o-7", 7)]
    assert dead == []


# -- timeouts, retries and dead-letter reasons --------------------------------------------------------------


async def test_handler_past_its_timeout_is_dead_lettered_as_handler_timeout(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    attempts: list[int] = []
    fast_calls: list[uuid.UUID] = []

    @bus.subscribe(name="slow", timeout=0.1, max_attempts=3, backoff=QUICK)
    async def slow(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        await anyio.sleep(30)

    @bus.subscribe(name="fast", max_attempts=3, backoff=QUICK)
    async def fast(event: OrderPlaced, ctx: Context) -> None:
        fast_calls.append(ctx.event_id)

    async with bus:
        async with bus.transaction() as tx:
            row_id = await tx.publish(OrderPlaced("o-1", 1))
        await bus.drain(DRAIN)
        dead = await letters(bus)

    assert attempts == [1, 2, 3]
    assert fast_calls == [row_id]  # the other subscriber ran exactly once, not once per retry
    assert len(dead) == 1
    (letter,) = dead
    assert letter.reason == Reason.HANDLER_TIMEOUT
    assert letter.subscriber == "slow"
    assert letter.event_id == row_id
    assert letter.attempts == 3
    assert letter.error is not None and "timeout of 0.1 s" in letter.error
    stats = bus.statistics()
    assert stats.dead_lettered == 1 and stats.delivered == 1 and stats.retried == 2


async def test_raising_handler_is_dead_lettered_and_only_it_is_retried(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    calls: Counter[str] = Counter()

    @bus.subscribe(name="broken", max_attempts=4, backoff=QUICK)
    async def broken(event: OrderPlaced, ctx: Context) -> None:
        calls["broken"] += 1
        raise ValueError(f"cannot handle {event.order_id} (attempt {ctx.attempt})")

    @bus.subscribe(name="healthy", max_attempts=4, backoff=QUICK)
    async def healthy(event: OrderPlaced, ctx: Context) -> None:
        calls["healthy"] += 1

    async with bus:
        async with bus.transaction() as tx:
            row_id = await tx.publish(OrderPlaced("o-9", 9))
        await bus.drain(DRAIN)
        dead = await letters(bus)
        assert row_id is not None
        original = await bus.outbox.get(row_id)
        retry_rows = await bus.pool.fetch(
            f'SELECT target, status FROM "{eventbus_schema}".eventbus_outbox WHERE id <> $1', row_id
        )

    assert calls == {"broken": 4, "healthy": 1}
    assert [(d.reason, d.subscriber, d.attempts, d.error_type) for d in dead] == [
        (Reason.DELIVERY_FAILED, "broken", 4, "ValueError")
    ]
    assert dead[0].error == "ValueError: cannot handle o-9 (attempt 4)"
    # The original row is relayed; the retries went through one row targeted at the failing subscriber alone
    # (sent back to pending after each failure), which ends dead.
    assert original is not None and original["status"] == Status.RELAYED
    assert [(r["target"], r["status"]) for r in retry_rows] == [("broken", Status.DEAD)]


async def test_payload_that_does_not_decode_is_dead_lettered_without_retries(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    calls: list[OrderPlaced] = []

    @bus.subscribe(name="strict", max_attempts=5, backoff=QUICK)
    async def strict(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event)

    async with bus:
        async with bus.transaction() as tx:
            bad = NewEvent(topic="OrderPlaced", payload=b'{"order_id": 17}')  # wrong type, field missing
            (row_id,) = (await bus.outbox.offer(tx.connection, [bad])).ids
            await tx.publish(OrderPlaced("fine", 1))
        await bus.drain(DRAIN)
        dead = await letters(bus)

    assert calls == [OrderPlaced("fine", 1)]
    assert len(dead) == 1
    assert dead[0].reason == Reason.DESERIALIZATION_FAILED
    assert dead[0].event_id == row_id
    assert dead[0].subscriber == "strict"
    assert dead[0].attempts == 1
    assert dead[0].error is not None and "does not decode into OrderPlaced" in dead[0].error
    assert bus.statistics().retried == 0


async def _publish_unrouted(bus: EventBus) -> tuple[uuid.UUID, list[DeadLetter], Any]:
    """Publish an event no subscriber of ``bus`` takes; return its row id, the dead letters and its row."""

    @bus.subscribe(name="orders")
    async def orders(event: OrderPlaced) -> None:
        pass

    async with bus:
        async with bus.transaction() as tx:
            row_id = await tx.publish(Audited("nobody listens"))
        await bus.drain(DRAIN)
        dead = await letters(bus)
        assert row_id is not None
        row = await bus.outbox.get(row_id)
    return row_id, dead, row


async def test_unrouted_topic_is_dead_lettered_as_handler_missing(eventbus_dsn: str, eventbus_schema: str) -> None:
    row_id, dead, row = await _publish_unrouted(make_bus(eventbus_dsn, eventbus_schema))
    assert [(d.reason, d.event_id, d.subscriber, d.topic) for d in dead] == [
        (Reason.HANDLER_MISSING, row_id, None, "Audited")
    ]
    assert row is not None and row["status"] == Status.DEAD


async def test_unrouted_drop_leaves_no_dead_letter(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema, unrouted="drop")
    _, dead, row = await _publish_unrouted(bus)
    assert dead == []
    assert row is not None and row["status"] == Status.RELAYED
    assert bus.statistics().dropped == 1


# -- transactional subscribers and the inbox ----------------------------------------------------------------


async def test_transactional_writes_commit_with_the_inbox_row(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    table = f'"{eventbus_schema}".effects'

    @bus.subscribe(name="reserve", transactional=True)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        await ctx.connection.execute(f"INSERT INTO {table} VALUES ($1, $2)", ctx.event_id, event.order_id)

    async with bus:
        await create_effects(bus)
        async with bus.transaction() as tx:
            row_id = await tx.publish(OrderPlaced("o-1", 1))
        await bus.drain(DRAIN)
        effects = await bus.pool.fetch(f"SELECT event_id, note FROM {table}")
        inbox = await bus.pool.fetch(f'SELECT subscriber, event_id FROM "{eventbus_schema}".eventbus_inbox')

    assert [(r["event_id"], r["note"]) for r in effects] == [(row_id, "o-1")]
    assert [(r["subscriber"], r["event_id"]) for r in inbox] == [("reserve", row_id)]


async def test_raising_transactional_handler_rolls_its_writes_back(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    table = f'"{eventbus_schema}".effects'
    calls: list[int] = []

    @bus.subscribe(name="reserve", transactional=True, max_attempts=3, backoff=QUICK)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(ctx.attempt)
        await ctx.connection.execute(f"INSERT INTO {table} VALUES ($1, $2)", ctx.event_id, event.order_id)
        raise RuntimeError("out of stock")

    async with bus:
        await create_effects(bus)
        async with bus.transaction() as tx:
            row_id = await tx.publish(OrderPlaced("o-1", 1))
        await bus.drain(DRAIN)
        effects = await bus.pool.fetchval(f"SELECT count(*) FROM {table}")
        inbox = await bus.pool.fetchval(f'SELECT count(*) FROM "{eventbus_schema}".eventbus_inbox')
        dead = await letters(bus)

    assert calls == [1, 2, 3]
    assert effects == 0
    assert inbox == 0  # the inbox row rolled back with the handler's writes, so a replay may run it again
    assert [(d.reason, d.event_id, d.attempts) for d in dead] == [(Reason.DELIVERY_FAILED, row_id, 3)]


async def test_identical_redelivery_is_skipped_and_counted(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    table = f'"{eventbus_schema}".effects'
    calls: list[uuid.UUID] = []

    @bus.subscribe(name="reserve", transactional=True)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(ctx.event_id)
        await ctx.connection.execute(f"INSERT INTO {table} VALUES ($1, $2)", ctx.event_id, event.order_id)

    async with bus:
        await create_effects(bus)
        first = bus.encode(OrderPlaced("o-1", 1))
        async with bus.transaction() as tx:
            (event_id,) = (await tx.offer([first])).ids
        await bus.drain(DRAIN)
        assert event_id is not None
        # The same event (same event_id, same payload) arrives again, as after a relay crash.
        again = NewEvent(topic=first.topic, payload=first.payload, event_id=event_id)
        async with bus.transaction() as tx:
            (second_row,) = (await tx.offer([again])).ids
        await bus.drain(DRAIN)
        effects = await bus.pool.fetchval(f"SELECT count(*) FROM {table}")
        dead = await letters(bus)
        assert second_row is not None
        second = await bus.outbox.get(second_row)

    assert second_row != event_id
    assert calls == [event_id]
    assert effects == 1
    assert dead == []
    assert second is not None and second["status"] == Status.RELAYED
    stats = bus.statistics()
    assert stats.duplicates_skipped == 1 and stats.delivered == 1


async def test_different_payload_under_a_seen_event_id_is_a_duplicate_event(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    table = f'"{eventbus_schema}".effects'
    calls: list[str] = []

    @bus.subscribe(name="reserve", transactional=True, max_attempts=3, backoff=QUICK)
    async def reserve(event: OrderPlaced, ctx: Context) -> None:
        calls.append(event.order_id)
        await ctx.connection.execute(f"INSERT INTO {table} VALUES ($1, $2)", ctx.event_id, event.order_id)

    async with bus:
        await create_effects(bus)
        async with bus.transaction() as tx:
            event_id = await tx.publish(OrderPlaced("o-1", 1))
        await bus.drain(DRAIN)
        changed = bus.encode(OrderPlaced("o-1", 999))
        forged = NewEvent(topic=changed.topic, payload=changed.payload, event_id=event_id)
        async with bus.transaction() as tx:
            await tx.offer([forged])
        await bus.drain(DRAIN)
        effects = await bus.pool.fetch(f"SELECT note FROM {table}")
        dead = await letters(bus)

    assert calls == ["o-1"]
    assert [r["note"] for r in effects] == ["o-1"]
    assert [(d.reason, d.event_id, d.subscriber, d.attempts) for d in dead] == [
        (Reason.DUPLICATE_EVENT, event_id, "reserve", 1)
    ]
    assert msgspec.json.decode(dead[0].payload) == {"order_id": "o-1", "total_cents": 999}


async def test_ctx_publish_commits_with_the_transactional_handler(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    shipped: list[tuple[OrderShipped, dict[str, str]]] = []

    @bus.subscribe(name="ship", transactional=True, max_attempts=3, backoff=QUICK)
    async def ship(event: OrderPlaced, ctx: Context) -> None:
        await ctx.publish(OrderShipped(f"{event.order_id}/attempt-{ctx.attempt}"), key=event.order_id)
        if ctx.attempt == 1:
            raise RuntimeError("courier unavailable")  # the follow-up event rolls back with the handler

    @bus.subscribe(name="notify")
    async def notify(event: OrderShipped, ctx: Context) -> None:
        shipped.append((event, dict(ctx.headers)))

    async with bus:
        async with bus.transaction() as tx:
            placed_id = await tx.publish(OrderPlaced("o-1", 1), headers={"correlation_id": "corr-1"})
        await bus.drain(DRAIN)
        topics = await bus.pool.fetch(f'SELECT topic, target FROM "{eventbus_schema}".eventbus_outbox ORDER BY id')

    assert [event for event, _ in shipped] == [OrderShipped("o-1/attempt-2")]
    headers = shipped[0][1]
    assert headers["causation_id"] == str(placed_id)
    assert headers["correlation_id"] == "corr-1"
    # The placed row, the targeted retry of "ship", and one shipped row: the first attempt's follow-up is gone.
    assert [(r["topic"], r["target"]) for r in topics] == [
        ("OrderPlaced", None), ("OrderPlaced", "ship"), ("OrderShipped", None),
    ]  # fmt: skip


# -- ordering -----------------------------------------------------------------------------------------------


KEYS = [f"k{i}" for i in range(5)]


async def _publish_sequenced(bus: EventBus, per_key: int, transactions: int) -> list[tuple[str, int]]:
    """Publish ``per_key`` events per key, interleaved over keys, split over several transactions."""
    order = [(key, n) for n in range(per_key) for key in KEYS]
    chunk = -(-len(order) // transactions)
    for start in range(0, len(order), chunk):
        async with bus.transaction() as tx:
            for key, n in order[start : start + chunk]:
                await tx.publish(Sequenced(key, n), key=key)
    return order


def _assert_per_key_order(handled: list[tuple[str, int]], per_key: int) -> None:
    for key in KEYS:
        assert [n for k, n in handled if k == key] == list(range(per_key)), f"key {key} out of order"


async def test_ordered_subscriber_keeps_per_key_order_with_concurrency(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    handled: list[tuple[str, int]] = []
    active: Counter[str] = Counter()
    overlapped: list[str] = []

    @bus.subscribe(name="ordered", ordered=True, concurrency=4)
    async def ordered(event: Sequenced, ctx: Context) -> None:
        active[event.key] += 1
        if active[event.key] > 1:
            overlapped.append(event.key)
        # Later events of a key take less time: without lanes they would overtake earlier ones.
        await anyio.sleep(0.002 * (12 - event.n))
        handled.append((event.key, event.n))
        active[event.key] -= 1

    async with bus:
        await _publish_sequenced(bus, per_key=12, transactions=4)
        await bus.drain(DRAIN)

    assert overlapped == []
    _assert_per_key_order(handled, 12)


async def test_ordered_subscriber_retries_in_place_and_keeps_order(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    handled: list[tuple[str, int]] = []
    attempts: list[tuple[str, int, int]] = []

    @bus.subscribe(name="ordered", ordered=True, concurrency=3, max_attempts=3, backoff=Backoff(0.05, jitter=0))
    async def ordered(event: Sequenced, ctx: Context) -> None:
        attempts.append((event.key, event.n, ctx.attempt))
        if event.key == "k1" and event.n == 2 and ctx.attempt < 3:
            raise ConnectionError("flaky downstream")
        handled.append((event.key, event.n))

    async with bus:
        await _publish_sequenced(bus, per_key=6, transactions=2)
        await bus.drain(DRAIN)
        dead = await letters(bus)
        targeted = await bus.pool.fetchval(
            f'SELECT count(*) FROM "{eventbus_schema}".eventbus_outbox WHERE target IS NOT NULL'
        )

    assert dead == []
    assert targeted == 0  # retried in place, not through a targeted retry row
    assert [a for k, n, a in attempts if (k, n) == ("k1", 2)] == [1, 2, 3]
    _assert_per_key_order(handled, 6)
    stats = bus.statistics()
    assert stats.failed == 2 and stats.delivered == len(KEYS) * 6


# -- drain --------------------------------------------------------------------------------------------------


async def test_drain_without_a_relay_times_out_with_a_helpful_message(bus: EventBus) -> None:
    async with bus.transaction() as tx:
        await tx.publish(OrderPlaced("o-1", 1))
        await tx.publish(OrderPlaced("o-2", 2))
    assert bus.relay is None
    with pytest.raises(TimeoutError, match=r"2 events were still pending or claimed after 0\.3 s; is a relay"):
        await bus.drain(0.3)


# -- the transport seam and settings ---------------------------------------------------------------------------


async def test_a_transport_given_to_the_bus_delivers(eventbus_dsn: str, eventbus_schema: str) -> None:
    transport = LocalTransport(mailbox_size=2)
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=FAST, transport=transport)
    seen: list[int] = []

    @bus.subscribe(name="seen", ordered=True)
    async def record(event: Sequenced) -> None:
        seen.append(event.n)

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish_many([Sequenced("one", n) for n in range(20)], key="one")
        await bus.drain(DRAIN)
    assert sorted(seen) == list(range(20))
    assert transport.statistics().delivered == 20 == bus.statistics().delivered


async def test_settings_that_cannot_be_used_are_refused(eventbus_dsn: str, eventbus_schema: str) -> None:
    with pytest.raises(ConfigurationError, match="transport must be 'local' or a Transport instance"):
        EventBus(eventbus_dsn, schema=eventbus_schema, transport="carrier-pigeon")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="mailbox_size must be at least 1"):
        LocalTransport(mailbox_size=0)
    bus = EventBus(eventbus_dsn, schema=eventbus_schema)
    with pytest.raises(ConfigurationError, match="schema name 'Not Valid'"):
        bus.schema = "Not Valid"
    async with bus:
        with pytest.raises(ConfigurationError, match="cannot change dsn of a connected bus"):
            bus.dsn = "postgresql://elsewhere/db"
        async with bus.transaction() as tx:
            with pytest.raises(ConfigurationError, match="an idempotency key names one event"):
                await tx.publish_many([Sequenced("one", 1)], idempotency_key="once")
            with pytest.raises(ConfigurationError, match=r"is encoded already: offer it with tx\.offer"):
                await tx.publish_many([bus.encode(Sequenced("one", 1))])
        with pytest.raises(ConfigurationError, match="cannot publish on NoneType"):
            await bus.publish(Sequenced("one", 1), connection=None)
