from __future__ import annotations

import re

import anyio
import asyncpg
import msgspec
import pytest
from hypothesis import strategies as st

from eventbus import Backoff, Context, DeadLetterFilter, EventBus, Reason, RelayConfig
from eventbus.testing import ReplayCheckFailed, assert_replay_safe, events_of

FAST = RelayConfig(poll_interval=0.02, lease=5, reclaim_interval=0.5, heartbeat_interval=0.5)


class Charged(msgspec.Struct, frozen=True):
    n: int


@pytest.mark.anyio
async def test_concurrent_replays_of_1000_dead_letters_have_one_effect_each(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=FAST)
    failing = True

    @bus.subscribe(transactional=True, max_attempts=1, concurrency=4, name="charge")
    async def charge(event: Charged, ctx: Context) -> None:
        if failing:
            raise ConnectionError("payment provider down")
        await ctx.connection.execute(
            f'INSERT INTO "{eventbus_schema}".effects (event_id, n) VALUES ($1, $2)', ctx.event_id, event.n
        )

    async with bus:
        await bus.pool.execute(f'CREATE TABLE "{eventbus_schema}".effects (event_id uuid, n int)')
        async with bus.transaction() as tx:
            await tx.publish_many([Charged(n) for n in range(1000)])
        await bus.drain(timeout=120)
        assert (await bus.dead_letters.count()) == {(Reason.DELIVERY_FAILED.value, "charge"): 1000}

        failing = False
        replayed: list[int] = []

        async def replay() -> None:
            replayed.append(len(await bus.dead_letters.replay(DeadLetterFilter(subscriber="charge"), page=100)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(replay)
            tg.start_soon(replay)
        assert sum(replayed) == 1000
        await bus.drain(timeout=120)

        effects = await bus.pool.fetch(
            f'SELECT event_id, count(*) AS n FROM "{eventbus_schema}".effects GROUP BY event_id'
        )
        assert len(effects) == 1000
        assert {row["n"] for row in effects} == {1}
        letters = await bus.dead_letters.list(DeadLetterFilter(include_replayed=True), limit=2000)
        assert len(letters) == 1000
        assert all(d.replayed_at is not None and d.replay_count == 1 for d in letters)
        # Replaying again finds nothing left to replay.
        assert (await bus.dead_letters.replay(DeadLetterFilter(subscriber="charge"))).count == 0


@pytest.mark.anyio
async def test_dry_run_writes_nothing_and_rate_paces(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=FAST)

    @bus.subscribe(max_attempts=1, name="always_fails")
    async def always_fails(event: Charged) -> None:
        raise RuntimeError("nope")

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish_many([Charged(n) for n in range(6)])
        await bus.drain(timeout=30)
        would = await bus.dead_letters.replay(dry_run=True)
        assert len(would) == 6
        assert all(d.replayed_at is None for d in await bus.dead_letters.list())
        started = anyio.current_time()
        done = await bus.dead_letters.replay(rate=4, page=100)
        assert len(done) == 6
        assert anyio.current_time() - started >= 1.0  # 6 letters at 4/s: two pages, one pause


class Ordered(msgspec.Struct, frozen=True):
    order_id: str


SETUP = "CREATE TABLE reservations (order_id text NOT NULL, event_id uuid NOT NULL)"


async def _setup(conn: object) -> None:
    await conn.execute(SETUP)  # type: ignore[attr-defined]


async def _one_reservation_per_order(conn: object, events: list[Ordered]) -> None:
    rows = await conn.fetch(  # type: ignore[attr-defined]
        "SELECT event_id, count(*) AS n FROM reservations GROUP BY event_id HAVING count(*) > 1"
    )
    assert not rows, f"{len(rows)} events reserved stock more than once"


def _planted_bus(transactional: bool) -> object:
    def factory(dsn: str, schema: str) -> EventBus:
        bus = EventBus(dsn, schema=schema)

        if transactional:

            @bus.subscribe(transactional=True, max_attempts=2, backoff=Backoff(0.01), name="reserve")
            async def reserve_tx(event: Ordered, ctx: Context) -> None:
                await ctx.connection.execute(
                    "INSERT INTO reservations (order_id, event_id) VALUES ($1, $2)", event.order_id, ctx.event_id
                )

        else:

            @bus.subscribe(max_attempts=2, backoff=Backoff(0.01), name="reserve")
            async def reserve(event: Ordered, ctx: Context) -> None:
                async with bus.pool.acquire() as conn:  # its own connection: no inbox, not idempotent
                    await conn.execute(
                        "INSERT INTO reservations (order_id, event_id) VALUES ($1, $2)", event.order_id, ctx.event_id
                    )

        return bus

    return factory


ORDERS = events_of(Ordered, order_id=st.sampled_from(["o-1", "o-2", "o-3"]))


@pytest.mark.slow
def test_harness_finds_a_non_idempotent_handler_and_shrinks_it(eventbus_dsn: str) -> None:
    with pytest.raises(ReplayCheckFailed) as failure:
        assert_replay_safe(
            _planted_bus(transactional=False), events=ORDERS, setup=_setup, check=_one_reservation_per_order,
            dsn=eventbus_dsn, max_examples=40,
        )  # fmt: skip
    notes = "\n".join(getattr(failure.value, "__notes__", []))
    steps = re.findall(r"^\s+\d+\. publish", notes, flags=re.MULTILINE)
    assert "reserved stock more than once" in str(failure.value)
    assert 1 <= len(steps) <= 3, notes
    assert "delivered twice" in notes or "replayed" in notes or "time out" in notes, notes


def test_harness_passes_the_same_handler_made_transactional(eventbus_dsn: str) -> None:
    assert_replay_safe(
        _planted_bus(transactional=True), events=ORDERS, setup=_setup, check=_one_reservation_per_order,
        dsn=eventbus_dsn, max_examples=15,
    )  # fmt: skip


def test_each_example_gets_the_schema_as_new(eventbus_dsn: str) -> None:
    """What a setup made (a table named like eventbus's own included) is gone before the next example's setup,
    eventbus's rows are gone, and the schema and the bus are reused; setup and check get a new connection each
    example (its temporary table and settings go with it); an example that ends in an error gets a new schema
    and a new bus."""
    from eventbus.testing import _Session

    async def setup(conn: object) -> None:
        await conn.execute(  # type: ignore[attr-defined]
            "CREATE TABLE eventbus_audit (n int); INSERT INTO eventbus_audit VALUES (1); "
            "CREATE TEMP TABLE scratch (n int); SET work_mem = '8MB'"  # what a session keeps
        )

    async def examples() -> None:
        session = _Session(eventbus_dsn, _planted_bus(transactional=True), setup, 0.2)  # type: ignore[arg-type]
        try:
            conn, first = await session.prepare()
            for _ in range(3):
                assert await conn.fetchval("SHOW work_mem") == "8MB"
                assert await conn.fetchval("SELECT count(*) FROM eventbus_audit") == 1
                await conn.execute("INSERT INTO eventbus_tenant_roles VALUES ('someone', 'acme')")
                async with first.transaction() as tx:
                    await tx.publish(Ordered("o-1"))
                await first.drain(timeout=30)  # as an example ends: nothing in flight when the next one resets
                conn, bus = await session.prepare()
                assert bus is first and session.reuse
                assert await conn.fetchval("SELECT count(*) FROM eventbus_outbox") == 0
                assert await conn.fetchval("SELECT count(*) FROM eventbus_tenant_roles") == 0
            await session.discard()
            conn, second = await session.prepare()
            assert second is not first
            assert await conn.fetchval("SELECT count(*) FROM eventbus_audit") == 1
        finally:
            await session.close()
        probe = await asyncpg.connect(eventbus_dsn)
        try:
            assert await probe.fetchval("SELECT to_regnamespace($1)", session.name) is None
        finally:
            await probe.close()

    anyio.run(examples)
