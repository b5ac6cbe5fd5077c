"""How many statements the happy path of a fan-out costs: one offer for a whole transaction's events, and a
claim plus a settle per batch, never a statement per event or per delivery."""

from __future__ import annotations

import math
from collections import Counter

import anyio.lowlevel
import asyncpg
import msgspec
import pytest
from asyncpg.connection import LoggedQuery

from eventbus import EventBus, RelayConfig
from eventbus.sql import Queries

pytestmark = pytest.mark.anyio

EVENTS = 200
SUBSCRIBERS = 4
BATCH = 200
POOL_SIZE = 4


class Ping(msgspec.Struct, frozen=True):
    seq: int


def _subscribe(bus: EventBus, name: str, seen: Counter[str]) -> None:
    @bus.subscribe(name=name, timeout=10)
    async def handler(event: Ping) -> None:
        seen[name] += 1


async def test_fan_out_costs_one_offer_and_a_claim_and_a_settle_per_batch(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    queries = Queries(eventbus_schema)
    # No NOTIFY: the relay claims at start, on its poll and when drain() wakes it.
    config = RelayConfig(batch_size=BATCH, use_notify=False, poll_interval=0.05)
    phase = "setup"
    logged: list[tuple[str, str]] = []
    reset_queries: set[str] = set()

    def log(record: LoggedQuery) -> None:
        logged.append((phase, record.query))

    async def instrument(conn: asyncpg.Connection) -> None:
        # Every connection of the bus's pools, the relay's own included, logs its statements. The relay's session
        # connection (LISTEN, pings) is outside the pools: not counted.
        conn.add_query_logger(log)
        reset_queries.add(conn.get_reset_query())

    bus = EventBus(
        eventbus_dsn, schema=eventbus_schema, migrate=False, pool_size=POOL_SIZE, relay_config=config,
        init_connection=instrument,
    )  # fmt: skip
    seen: Counter[str] = Counter()
    for i in range(SUBSCRIBERS):
        _subscribe(bus, f"sub{i}", seen)

    await bus.connect()
    # Everything is committed before the relay starts, so its first claim takes the whole batch.
    phase = "publish"
    async with bus.transaction() as tx:
        await tx.publish_many([Ping(seq) for seq in range(EVENTS)])
    await anyio.lowlevel.checkpoint()  # loggers run through call_soon: let them see this phase

    phase = "relay"
    async with bus:
        await bus.drain(timeout=60)
        relay = bus.statistics().relay
    await anyio.lowlevel.checkpoint()

    assert seen == {f"sub{i}": EVENTS for i in range(SUBSCRIBERS)}
    assert relay is not None and relay.claimed == EVENTS and relay.settled == EVENTS

    def kinds(in_phase: str) -> Counter[str]:
        named = {query.sql: name for name, query in queries.by_name.items()}
        named[queries.outbox_unsettled] = "drain"  # the only statement of drain(); the relay never issues it
        counts: Counter[str] = Counter()
        for when, query in logged:
            if when != in_phase:
                continue
            if query in reset_queries:
                kind = "pool reset"  # asyncpg's own, once per acquire: housekeeping, not the bus's SQL
            elif "typeinfo_tree" in query or "set_config('jit'" in query:
                # asyncpg looks up a type it has not seen on this connection yet (with JIT off meanwhile): once
                # per connection and type, whatever the number of events.
                kind = "asyncpg type introspection"
            elif query.split(None, 1)[0].rstrip(";").upper() in {"BEGIN", "COMMIT", "ROLLBACK"}:
                kind = "transaction"
            else:
                kind = named.get(query, query)
            counts[kind] += 1
        return counts

    published = kinds("publish")
    assert published["offer"] == 1, published
    assert set(published) <= {"offer", "transaction", "pool reset", "asyncpg type introspection"}, published

    # drain() polls the outbox through the same pool; those polls are the test's, not the relay's. Every other
    # statement on the pool in this phase is the relay's: claims (idle polls included), settles, and its
    # bookkeeping (heartbeat, partition checks, forgetting itself on stop).
    during = kinds("relay")
    not_relay = {"drain", "pool reset", "asyncpg type introspection"}
    relay_kinds = {kind: n for kind, n in during.items() if kind not in not_relay}
    relay_statements = sum(relay_kinds.values())
    per_event = relay_statements / EVENTS
    print(f"relay statements: {relay_statements} for {EVENTS} events x {SUBSCRIBERS} subscribers "
          f"({per_event:.3f} per event; {relay.batches} batch(es)): {relay_kinds}; not counted: "
          f"{ {kind: n for kind, n in during.items() if kind in not_relay} }")  # fmt: skip
    assert "offer" not in relay_kinds
    assert relay_statements <= 2 * EVENTS, relay_kinds
    # The figure that shows a per-event or per-delivery write: one settle per claimed batch, and one batch.
    assert relay.batches == math.ceil(EVENTS / BATCH)
    assert relay_kinds.get("settle", 0) == relay.batches, relay_kinds
    assert relay_kinds.get("claim", 0) >= relay.batches, relay_kinds
