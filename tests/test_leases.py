"""Lease renewal: a relay extends the leases of the rows it holds, never another relay's, and never waits for a
row whose batch is being settled (waiting could deadlock with the settling statement)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from eventbus import NewEvent, OutboxRepository
from eventbus.sql import quote_schema

pytestmark = pytest.mark.anyio


@pytest.fixture
async def outbox(eventbus_dsn: str, eventbus_schema: str) -> AsyncIterator[OutboxRepository]:
    pool = await asyncpg.create_pool(eventbus_dsn, min_size=1, max_size=3)
    try:
        yield OutboxRepository(pool, eventbus_schema)
    finally:
        await pool.close()


async def test_renew_extends_own_leases_only_and_skips_rows_being_settled(outbox: OutboxRepository) -> None:
    table = f"{quote_schema(outbox.queries.schema)}.eventbus_outbox"
    async with outbox.pool.acquire() as conn, conn.transaction():
        await outbox.offer(conn, [NewEvent(topic="t", payload=b"{}") for _ in range(6)])
    mine = await outbox.claim(4, 1.0, "relay-a")
    theirs = await outbox.claim(2, 1.0, "relay-b")
    assert (len(mine), len(theirs)) == (4, 2)

    async def lease_left(row_id: object) -> float:
        value = await outbox.pool.fetchval(
            f"SELECT extract(epoch FROM claimed_until - now()) FROM {table} WHERE id = $1", row_id
        )
        return float(value)

    settling = await outbox.pool.acquire()
    try:
        # Another statement holds the first row's lock for 3 s, as the settling of its batch would.
        await settling.execute("BEGIN")
        await settling.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", mine[0].id)
        async with anyio.create_task_group() as tg:

            async def settle_later() -> None:
                await anyio.sleep(3)
                await settling.execute("ROLLBACK")

            tg.start_soon(settle_later)
            started = anyio.current_time()
            await outbox.renew("relay-a", [r.id for r in mine + theirs], 60.0)
            waited = anyio.current_time() - started
    finally:
        await outbox.pool.release(settling)
    assert waited < 1.5, f"renew waited {waited:.1f} s for a row being settled"

    assert await lease_left(mine[0].id) < 2, "the locked row was skipped"
    for row in mine[1:]:
        assert await lease_left(row.id) > 50, "the relay's other rows got the new lease"
    for row in theirs:
        assert await lease_left(row.id) < 2, "another relay's rows keep their lease"
