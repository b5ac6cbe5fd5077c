"""Random histories through the NATS transport, checked against DESIGN.md's invariants.

A history is producer transactions (committed or rolled back), each with events over a few keys, a plan of which
attempts of which subscriber fail, and consumer crashes between transactions: the consumer's connection is cut
while its handlers run, as when its process dies, and a new consumer takes over. Checked after each history:

1. every committed event reached every subscriber, or is a dead letter of the right reason; nothing rolled back
   was ever handled. An event whose every attempt fails is a dead letter. The attempt number is the broker's
   delivery count, so a crash uses up an attempt (as a relay's crash does with the local transport): an event
   may then end as a dead letter although fewer of its attempts failed, but only in a history with a crash;
2. the transactional subscriber's effect happened exactly once per event it handled, and it handled each one
   that is not its dead letter;
3. the ordered subscriber handled each key's events one at a time, its first successes in event id order.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import anyio
import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nats_server import drop_stream

from eventbus import Backoff, Context, EventBus, NatsTransport, RelayConfig, migrate
from eventbus.sql import quote_schema

pytestmark = [pytest.mark.slow]

KEYS = ["a", "b", "c"]
MAX_ATTEMPTS = 3


class Step(msgspec.Struct, frozen=True):
    n: int


@dataclass(frozen=True)
class Planned:
    n: int
    key: str
    #: Attempts that fail, per subscriber ("tx", "ordered"); all of 1..MAX_ATTEMPTS: a dead letter.
    fails: dict[str, frozenset[int]]


@dataclass(frozen=True)
class Transaction:
    commit: bool
    events: list[Planned]
    crash_after: bool


@st.composite
def histories(draw: st.DrawFn) -> list[Transaction]:
    counter = 0
    transactions = []
    for _ in range(draw(st.integers(1, 5))):
        events = []
        for _ in range(draw(st.integers(1, 4))):
            fails = {
                name: draw(st.frozensets(st.integers(1, MAX_ATTEMPTS), max_size=MAX_ATTEMPTS))
                for name in ("tx", "ordered")
            }
            events.append(Planned(counter, draw(st.sampled_from(KEYS)), fails))
            counter += 1
        transactions.append(Transaction(draw(st.booleans()), events, draw(st.booleans()) and draw(st.booleans())))
    return transactions


@dataclass
class Seen:
    plans: dict[int, Planned] = field(default_factory=dict)
    attempts: dict[tuple[str, int], list[int]] = field(default_factory=lambda: defaultdict(list))
    first_order: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    succeeded: set[tuple[str, int]] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    overlaps: int = 0


def _bus(dsn: str, schema: str, url: str, seen: Seen) -> EventBus:
    bus = EventBus(
        dsn, schema=schema, transport=NatsTransport(url, ack_wait=1.0, ack_timeout=5.0), stop_timeout=1.0,
        relay_config=RelayConfig(poll_interval=0.05, heartbeat_interval=0.2, lease=5.0),
    )  # fmt: skip
    backoff = Backoff(initial=0.02, factor=1, jitter=0)

    @bus.subscribe(name="tx", transactional=True, max_attempts=MAX_ATTEMPTS, backoff=backoff, concurrency=4)
    async def tx(event: Step, ctx: Context) -> None:
        seen.attempts[("tx", event.n)].append(ctx.attempt)
        if ctx.attempt in seen.plans[event.n].fails["tx"]:
            raise RuntimeError(f"planned failure of {event.n}")
        await ctx.connection.execute(f"INSERT INTO {quote_schema(schema)}.effects (n) VALUES ($1)", event.n)
        seen.succeeded.add(("tx", event.n))

    @bus.subscribe(name="ordered", ordered=True, max_attempts=MAX_ATTEMPTS, backoff=backoff, concurrency=4)
    async def ordered(event: Step, ctx: Context) -> None:
        assert ctx.key is not None
        if ctx.key in seen.running:
            seen.overlaps += 1
        seen.running.add(ctx.key)
        try:
            seen.attempts[("ordered", event.n)].append(ctx.attempt)
            await anyio.sleep(0.002)
            if ctx.attempt in seen.plans[event.n].fails["ordered"]:
                raise RuntimeError(f"planned failure of {event.n}")
            if event.n not in seen.first_order[ctx.key]:
                seen.first_order[ctx.key].append(event.n)
            seen.succeeded.add(("ordered", event.n))
        finally:
            seen.running.discard(ctx.key)

    return bus


async def _run(dsn: str, url: str, history: list[Transaction]) -> None:
    schema = f"p_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, schema)
        await conn.execute(f"CREATE TABLE {quote_schema(schema)}.effects (n int)")
        seen = Seen()
        bus = _bus(dsn, schema, url, seen)
        committed: list[Planned] = []
        async with bus:
            consumer_bus = _bus(dsn, schema, url, seen)
            stack = consumer_bus.consumer()
            consumer = await stack.__aenter__()
            try:
                for transaction in history:
                    for planned in transaction.events:
                        seen.plans[planned.n] = planned
                    try:
                        async with bus.transaction() as tx:
                            await tx.offer([bus.encode(Step(p.n), key=p.key) for p in transaction.events])
                            if not transaction.commit:
                                raise LookupError("rolled back")
                    except LookupError:
                        pass
                    else:
                        committed.extend(transaction.events)
                    if transaction.crash_after:
                        await anyio.sleep(0.05)
                        connection = consumer._connection
                        if connection is not None and connection.client is not None:
                            await connection.client.close()  # its process died: acks of what ran are lost
                        await stack.__aexit__(None, None, None)
                        await consumer_bus.close()
                        consumer_bus = _bus(dsn, schema, url, seen)
                        stack = consumer_bus.consumer()
                        consumer = await stack.__aenter__()
                await _settled(bus, conn, schema, committed, seen)
            finally:
                await stack.__aexit__(None, None, None)
                await consumer_bus.close()
            letters = await bus.dead_letters.list(limit=1000)
        effects = [row["n"] for row in await conn.fetch(f"SELECT n FROM {quote_schema(schema)}.effects")]
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_schema(schema)} CASCADE")
        await conn.close()
        await drop_stream(url, schema)

    committed_ns = {p.n for p in committed}
    handled = {n for (_, n) in seen.attempts}
    assert handled <= committed_ns, f"rolled back events were handled: {sorted(handled - committed_ns)}"
    dead = {(d.subscriber, msgspec.json.decode(d.payload, type=Step).n): d.reason for d in letters}
    crashed = any(t.crash_after for t in history)
    for planned in committed:
        for name in ("tx", "ordered"):
            share = (name, planned.n)
            if _doomed(planned, name):
                assert dead.get(share) == "DeliveryFailed", (name, planned, seen.attempts[share])
                assert share not in seen.succeeded
            elif share in dead:
                assert crashed, f"{share} dead-lettered without a crash: {planned}, {seen.attempts[share]}"
            else:
                assert share in seen.succeeded, (name, planned, seen.attempts[share])
    tx_handled = sorted(n for (name, n) in seen.succeeded if name == "tx")
    assert sorted(effects) == tx_handled, "one effect per event it handled, none for a dead letter"
    assert seen.overlaps == 0, "a key's events ran at once"
    by_key: dict[str, list[int]] = defaultdict(list)
    for planned in committed:
        if ("ordered", planned.n) in seen.succeeded:
            by_key[planned.key].append(planned.n)
    for key, numbers in by_key.items():
        assert seen.first_order[key] == numbers, f"key {key}: handled {seen.first_order[key]}, published {numbers}"


def _doomed(planned: Planned, name: str) -> bool:
    """Whether every attempt of ``name`` on the event fails (it ends as a dead letter)."""
    return planned.fails[name] >= set(range(1, MAX_ATTEMPTS + 1))


async def _settled(
    bus: EventBus, conn: asyncpg.Connection, schema: str, committed: list[Planned], seen: Seen
) -> None:
    """Wait until every committed event is handled or dead-lettered by both subscribers."""
    shares = {(name, p.n) for p in committed for name in ("tx", "ordered")}
    with anyio.fail_after(60):
        await bus.drain(60)
        while True:
            letters = await bus.dead_letters.list(limit=1000)
            dead = {(d.subscriber, msgspec.json.decode(d.payload, type=Step).n) for d in letters}
            if shares <= seen.succeeded | dead:
                break
            await anyio.sleep(0.05)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories())
def test_random_histories_through_nats_keep_the_invariants(
    eventbus_dsn: str, nats_url: str, history: list[Transaction]
) -> None:
    event(f"consumer crashes: {sum(t.crash_after for t in history)}")
    event(f"rolled back: {sum(not t.commit for t in history) > 0}")
    event(f"dead letters planned: {any(_doomed(p, n) for t in history for p in t.events for n in ('tx', 'ordered'))}")
    anyio.run(_run, eventbus_dsn, nats_url, history)
