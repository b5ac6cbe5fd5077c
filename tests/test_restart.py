"""A PostgreSQL restart under a running bus with producers: nothing lost, no effect twice, and delivery resumes
through the wake-up path (the relay polls once a minute, so polling cannot be what delivers in time).

The server is the test's own (tests/own_server.py), stopped with ``-m fast`` and ``-m immediate``.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import asyncpg
import msgspec
import pytest
from own_server import OwnServer

from eventbus import Context, DatabaseUnavailable, EventBus, RelayConfig, migrate

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SCHEMA = "restart"
GIVE_UP = 45.0  # well inside the minute between polls


class Order(msgspec.Struct, frozen=True):
    n: int


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_database_restart_under_producers_loses_nothing_and_doubles_nothing(
    tmp_path: Path, mode: str
) -> None:
    server = OwnServer(tmp_path)
    await anyio.to_thread.run_sync(server.init)
    await anyio.to_thread.run_sync(server.start)
    try:
        conn = await asyncpg.connect(server.dsn)
        await migrate(conn, SCHEMA)
        await conn.execute(f"CREATE TABLE {SCHEMA}.effects (event_id uuid PRIMARY KEY, n int NOT NULL)")
        await conn.close()
        config = RelayConfig(poll_interval=60.0, heartbeat_interval=0.5, lease=5.0, reclaim_interval=1.0)
        bus = EventBus(server.dsn, schema=SCHEMA, relay_config=config, pool_size=4)

        @bus.subscribe(name="fulfil", transactional=True)
        async def fulfil(event: Order, ctx: Context) -> None:
            await ctx.connection.execute(
                f"INSERT INTO {SCHEMA}.effects (event_id, n) VALUES ($1, $2)", ctx.event_id, event.n
            )

        committed: set[int] = set()
        next_n = 0

        async def produce(until: anyio.Event) -> None:
            nonlocal next_n
            while not until.is_set():
                n, next_n = next_n, next_n + 1
                try:
                    async with bus.transaction() as tx:
                        await tx.publish(Order(n))
                    committed.add(n)
                except DatabaseUnavailable:
                    pass  # not committed (or not known to be: a restart can cut the COMMIT's answer off)
                await anyio.sleep(0.01)

        async with bus:
            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce, done)
                tg.start_soon(produce, done)
                await anyio.sleep(1.0)
                await anyio.to_thread.run_sync(server.stop, mode)
                await anyio.sleep(2.0)  # down for a while: producers fail, the relay backs off
                await anyio.to_thread.run_sync(server.start)
                await anyio.sleep(2.0)  # producers commit again; the relay must wake for their events
                done.set()
            # Until every committed event's effect is in (not merely its handler run: one that ran as the server
            # went down had its transaction fail to commit, and its retry comes after the backoff).
            effected: set[int] = set()
            with anyio.move_on_after(GIVE_UP):
                while not committed <= effected:
                    await anyio.sleep(0.05)
                    effected = {r["n"] for r in await bus.pool.fetch(f"SELECT n FROM {SCHEMA}.effects")}
            missing = sorted(committed - effected)
            if missing:
                rows = await bus.pool.fetch(
                    f"SELECT (payload->>'n')::int AS n, status, attempts, target, claimed_by, claimed_until, "
                    f"available_at, now() AS now FROM {SCHEMA}.eventbus_outbox "
                    "WHERE (payload->>'n')::int = ANY($1::int[])", missing[:20],
                )
                pytest.fail(f"{len(missing)} committed events never handled: {missing[:20]}; rows: "
                            f"{[dict(r) for r in rows]}; relay: {bus.relay.statistics() if bus.relay else None}")
            effects = await bus.pool.fetch(f"SELECT n FROM {SCHEMA}.effects")
            letters = await bus.dead_letters.count()
        assert committed, "producers committed events"
        assert max(committed) > min(committed) + 100, "before and after the restart"
        effect_ns = [r["n"] for r in effects]
        assert len(effect_ns) == len(set(effect_ns)), "no effect twice"
        assert committed <= set(effect_ns), "nothing committed was lost"
        assert letters == {}
    finally:
        await anyio.to_thread.run_sync(server.ensure_stopped)
