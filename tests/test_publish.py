from __future__ import annotations

import asyncpg
import msgspec
import pytest

from eventbus import EventBus, NotInTransaction, Status

pytestmark = pytest.mark.anyio


class OrderPlaced(msgspec.Struct, frozen=True):
    order_id: str
    total_cents: int


async def test_publish_in_transaction_commits_with_it(bus: EventBus) -> None:
    async with bus.transaction() as tx:
        row_id = await tx.publish(OrderPlaced("o-1", 1299), key="o-1")
    assert row_id is not None
    row = await bus.outbox.get(row_id)
    assert row is not None
    assert row["topic"] == "OrderPlaced"
    assert row["status"] == Status.PENDING
    assert msgspec.json.decode(row["payload"]) == {"order_id": "o-1", "total_cents": 1299}


async def test_rolled_back_publish_leaves_nothing(bus: EventBus) -> None:
    with pytest.raises(RuntimeError):
        async with bus.transaction() as tx:
            row_id = await tx.publish(OrderPlaced("o-2", 1))
            raise RuntimeError("business failure")
    assert row_id is not None
    assert await bus.outbox.get(row_id) is None


async def test_publish_outside_transaction_names_the_fix(bus: EventBus) -> None:
    async with bus.pool.acquire() as conn:
        with pytest.raises(NotInTransaction, match=r"conn\.transaction\(\)"):
            await bus.publish(OrderPlaced("o-3", 1), connection=conn)
    counts = await bus.outbox.counts()
    assert counts["pending"] == 0


async def test_publish_on_callers_asyncpg_connection(bus: EventBus, eventbus_dsn: str) -> None:
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        async with conn.transaction():
            row_id = await bus.publish(OrderPlaced("o-4", 4), connection=conn)
    finally:
        await conn.close()
    assert row_id is not None and await bus.outbox.get(row_id) is not None
