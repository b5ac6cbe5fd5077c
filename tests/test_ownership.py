"""Partition ownership fenced in the database: a relay that lost a partition can neither claim nor settle its
keyed rows; a relay that joins gets its share under load; a relay that stops hands its partitions over at once;
killing a relay's sessions never lets two relays handle one key at the same time.

Each relay-level test is a scenario that failed on 0.1.0, where ownership was a session advisory lock.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest

from eventbus import EventBus, NewEvent, RelayConfig, Settlement, Status
from eventbus.events import partition_of
from eventbus.sql import quote_schema

pytestmark = pytest.mark.anyio

GIVE_UP = 60.0


class Keyed(msgspec.Struct, frozen=True):
    key: str
    n: int


def config(**overrides: Any) -> RelayConfig:
    settings: dict[str, Any] = {"poll_interval": 0.05, "heartbeat_interval": 0.2, "reclaim_interval": 0.2}
    return RelayConfig(**{**settings, **overrides})


async def test_a_relay_that_lost_its_partition_can_neither_claim_nor_settle(bus: EventBus) -> None:
    partition = partition_of("k")
    assert partition is not None
    async with bus.transaction() as tx:
        await tx.offer([NewEvent(topic="Keyed", payload=b'{"key": "k", "n": 0}', key="k")])
    assert await bus.relays.acquire("relay-a", [partition], 30.0) == {partition: 1}
    (row,) = await bus.outbox.claim(10, 30.0, "relay-a")
    # relay-a stalls past its partition lease; relay-b takes the partition over (a new epoch).
    await bus.pool.execute(
        f"UPDATE {quote_schema(bus.schema)}.eventbus_partitions SET lease_until = now() - interval '1 s'"
    )
    assert await bus.relays.acquire("relay-b", [partition], 30.0) == {partition: 2}
    assert await bus.relays.renew("relay-a", [partition], 30.0) == {}, "a lost lease is not renewed"
    settlement = Settlement()
    settlement.mark(row, Status.RELAYED)
    assert await bus.outbox.settle("relay-a", settlement) == 0, "the former owner settled a row it no longer owns"
    async with bus.transaction() as tx:
        await tx.offer([NewEvent(topic="Keyed", payload=b'{"key": "k", "n": 1}', key="k")])
    assert await bus.outbox.claim(10, 30.0, "relay-a") == [], "the former owner claimed a keyed row"
    # The new owner takes the next row; the one relay-a held comes back to it once its lease is reclaimed.
    assert [r.key for r in await bus.outbox.claim(10, 30.0, "relay-b")] == ["k"]
    await bus.pool.execute(
        f"UPDATE {quote_schema(bus.schema)}.eventbus_outbox SET claimed_until = now() - interval '1 s' "
        "WHERE claimed_by = 'relay-a'"
    )
    assert await bus.outbox.reclaim() == 1
    (again,) = await bus.outbox.claim(10, 30.0, "relay-b")
    assert again.id == row.id and again.attempts == 2
    settlement = Settlement()
    settlement.mark(again, Status.RELAYED)
    assert await bus.outbox.settle("relay-b", settlement) == 1


async def _publish_steadily(bus: EventBus, keys: int, stop: anyio.Event, published: list[int]) -> None:
    n = 0
    while not stop.is_set():
        async with bus.transaction() as tx:
            for i in range(keys):
                await tx.publish(Keyed(f"k{i}", n), key=f"k{i}")
        published.append(n)
        n += 1
        await anyio.sleep(0.02)


def _relay_bus(dsn: str, schema: str, seen: defaultdict[str, list[str]], name: str, **settings: Any) -> EventBus:
    bus = EventBus(dsn, schema=schema, relay_config=config(**settings), stop_timeout=5, migrate=False)

    @bus.subscribe(name="keyed", ordered=True)
    async def handle(event: Keyed, ctx: Any) -> None:
        if ctx.key is not None:
            seen[name].append(ctx.key)
        await anyio.sleep(0.002)

    return bus


async def test_a_relay_that_joins_under_load_gets_a_share(eventbus_dsn: str, eventbus_schema: str) -> None:
    seen: defaultdict[str, list[str]] = defaultdict(list)
    publisher = EventBus(eventbus_dsn, schema=eventbus_schema, relay=False, migrate=False)
    stop = anyio.Event()
    published: list[int] = []
    async with publisher, anyio.create_task_group() as tg:
        # More than relay a handles: a backlog in every partition, so none of them is ever idle on relay a.
        tg.start_soon(_publish_steadily, publisher, 64, stop, published)
        async with _relay_bus(eventbus_dsn, eventbus_schema, seen, "a"):
            with anyio.fail_after(GIVE_UP):
                while not seen["a"]:  # noqa: ASYNC110 - waiting for the first relay to be busy
                    await anyio.sleep(0.05)
            async with _relay_bus(eventbus_dsn, eventbus_schema, seen, "b") as b:
                relay = b.relay
                assert relay is not None
                # The newcomer gets its half of the partitions, and their keys, while the load goes on.
                with anyio.fail_after(GIVE_UP):
                    while relay.statistics().partitions_owned < 16 or len(set(seen["b"])) < 8:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
            stop.set()


async def test_a_stopping_relay_hands_its_partitions_over_at_once(eventbus_dsn: str, eventbus_schema: str) -> None:
    seen: defaultdict[str, list[str]] = defaultdict(list)
    lease = GIVE_UP * 2  # a handover that waited for the lease would fail the test
    async with _relay_bus(eventbus_dsn, eventbus_schema, seen, "b", lease=lease) as b:
        async with _relay_bus(eventbus_dsn, eventbus_schema, seen, "a", lease=lease) as a:
            relay_a = a.relay
            assert relay_a is not None
            with anyio.fail_after(GIVE_UP):
                while relay_a.statistics().partitions_owned == 0:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            owned_by_a = relay_a.statistics().partitions_owned
        keys = [f"k{i}" for i in range(64)]  # every partition has some of these keys
        async with b.transaction() as tx:
            for key in keys:
                await tx.publish(Keyed(key, 0), key=key)
        with anyio.fail_after(GIVE_UP / 2):
            await b.drain(GIVE_UP / 2)
    assert owned_by_a > 0 and sorted(seen["b"]) == sorted(keys)


async def test_killed_sessions_never_let_two_relays_handle_a_key_at_once(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    running: dict[str, str] = {}  # key -> relay handling it now
    overlaps: list[tuple[str, str, str]] = []
    handled: defaultdict[str, list[int]] = defaultdict(list)

    def build(name: str) -> EventBus:
        # Each relay's connections carry its name, so the test kills only relay a's.
        separator = "&" if "?" in eventbus_dsn else "?"
        dsn = f"{eventbus_dsn}{separator}application_name=relay-{name}-{eventbus_schema}"
        bus = EventBus(dsn, schema=eventbus_schema, relay_config=config(lease=3, heartbeat_interval=1.0),
                       stop_timeout=5, migrate=False, pool_size=4)  # fmt: skip

        @bus.subscribe(name="keyed", ordered=True)
        async def handle(event: Keyed) -> None:
            other = running.get(event.key)
            if other is not None:
                overlaps.append((event.key, other, name))
            running[event.key] = name
            await anyio.sleep(0.01)
            running.pop(event.key, None)
            handled[event.key].append(event.n)

        return bus

    keys = [f"k{i}" for i in range(48)]
    rounds = 80
    admin = await asyncpg.connect(eventbus_dsn)
    try:
        async with build("a") as a, anyio.create_task_group() as tg:
            b_bus = build("b")

            async def b_joins_later() -> None:
                await anyio.sleep(0.5)  # relay a owns every partition and is busy with all of them
                async with b_bus:
                    with anyio.fail_after(GIVE_UP):
                        while sum(len(set(ns)) for ns in handled.values()) < rounds * len(keys):  # noqa: ASYNC110
                            await anyio.sleep(0.1)

            tg.start_soon(b_joins_later)
            for n in range(rounds):
                async with a.transaction() as tx:
                    for key in keys:
                        await tx.publish(Keyed(key, n), key=key)
                if n % 8 == 7:
                    # Kill relay a's session connection (LISTEN, and in 0.1.0 its partition locks), as a
                    # network failure or an idle-session timeout would; its pool goes on.
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 "
                        "AND (query ILIKE 'LISTEN%' OR query ILIKE '%advisory%' OR query ILIKE 'SELECT 1%')",
                        f"relay-a-{eventbus_schema}",
                    )
                await anyio.sleep(0.03)
    finally:
        await admin.close()
    assert not overlaps, f"{len(overlaps)} times two relays handled one key at once, e.g. {overlaps[:3]}"
    for key, ns in handled.items():
        firsts = list(dict.fromkeys(ns))
        assert firsts == sorted(firsts), f"key {key} out of order: {firsts}"


async def test_a_continuation_keeps_its_events_place_in_the_claim_order(bus: EventBus) -> None:
    worker = "relay-a"
    await bus.relays.acquire(worker, range(32), 30.0)
    async with bus.transaction() as tx:
        await tx.offer([NewEvent(topic="Keyed", payload=b'{"key": "k", "n": 1}', key="k")])
    (first,) = await bus.outbox.claim(1, 30.0, worker)
    async with bus.transaction() as tx:
        await tx.offer([NewEvent(topic="Keyed", payload=b'{"key": "k", "n": 2}', key="k")])
    # The first event settles for its other subscribers; a pending continuation carries one subscriber's share.
    settlement = Settlement()
    continuation = settlement.continuation(first, "slow", leased=False)
    settlement.mark(first, Status.RELAYED)
    assert await bus.outbox.settle(worker, settlement) == 1
    claimed = await bus.outbox.claim(10, 30.0, worker)
    assert next((row.id, row.target) for row in claimed) == (continuation.id, "slow"), (
        "the later event overtook the continuation of the earlier one"
    )
    assert [row.event_id for row in claimed] == sorted(row.event_id for row in claimed)


async def test_a_lone_relay_takes_back_partitions_whose_lease_ran_out(eventbus_dsn: str, eventbus_schema: str) -> None:
    seen: defaultdict[str, list[str]] = defaultdict(list)
    async with _relay_bus(eventbus_dsn, eventbus_schema, seen, "a", lease=1.0) as bus:
        relay = bus.relay
        assert relay is not None
        with anyio.fail_after(GIVE_UP):
            while relay.statistics().partitions_owned < 32:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        # The relay stalls past its leases (as in a long pause of its process): they run out under it.
        await bus.pool.execute(
            f"UPDATE {quote_schema(eventbus_schema)}.eventbus_partitions SET lease_until = now() - interval '1 s'"
        )
        keys = [f"k{i}" for i in range(64)]
        async with bus.transaction() as tx:
            for key in keys:
                await tx.publish(Keyed(key, 0), key=key)
        await bus.drain(GIVE_UP / 2)
    assert sorted(seen["a"]) == sorted(keys)


async def test_a_relay_that_lost_its_partitions_starts_none_of_their_queued_deliveries(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """Once a relay learns that its partitions were taken over, the deliveries of theirs still waiting in its
    mailboxes do not start (the new owner gets the rows); their settles were already fenced, but the handlers
    ran beside the new owner's (0.2.0 before: they all ran)."""
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=config(lease=3.0), relay=True)
    starts: list[tuple[float, str, int]] = []

    @bus.subscribe(name="ordered", ordered=True, concurrency=4)
    async def handle(event: Keyed) -> None:
        starts.append((anyio.current_time(), event.key, event.n))
        await anyio.sleep(0.05)

    await bus.connect()
    async with bus.transaction() as tx:
        await tx.offer([bus.encode(Keyed(key, n), key=key) for n in range(100) for key in ("a", "b", "c", "d")])
    async with bus:
        relay = bus.relay
        assert relay is not None
        with anyio.fail_after(GIVE_UP):
            while len(starts) < 8:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        # Another relay takes every partition over (as after this relay's lease ran out).
        await bus.pool.execute(
            f"UPDATE {quote_schema(eventbus_schema)}.eventbus_partitions "
            "SET owner = 'thief', epoch = epoch + 1, lease_until = now() + interval '1 hour'"
        )
        with anyio.fail_after(GIVE_UP):
            while relay.statistics().partitions_owned:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        noticed = anyio.current_time()
        await anyio.sleep(0.5)
        late = [start for start in starts if start[0] > noticed]
        assert not late, f"{len(late)} deliveries of lost partitions started after the loss, e.g. {late[:3]}"
        # The thief goes away: this relay takes the partitions back and delivers every event, in order per key.
        await bus.pool.execute(f"UPDATE {quote_schema(eventbus_schema)}.eventbus_partitions SET lease_until = now()")
        await bus.drain(GIVE_UP)
    first: defaultdict[str, list[int]] = defaultdict(list)
    for _, key, n in starts:
        if n not in first[key]:
            first[key].append(n)
    assert {key: ns for key, ns in first.items()} == {key: list(range(100)) for key in "abcd"}
