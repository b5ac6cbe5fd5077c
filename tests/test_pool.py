"""The bus's pool: a bus transaction's COMMIT carries the connection reset and the wake-up in one round trip, the
bus's own statements skip the reset, and every other way out of a connection still resets it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest
from listening import Listener

from eventbus import EventBus
from eventbus.sql import quote_schema

pytestmark = pytest.mark.anyio

LOCK_KEY = 715_001  # a session advisory lock the transactions below take and must not leak


class Shipped(msgspec.Struct, frozen=True):
    order_id: str


class Trips:
    """Every statement sent on the one connection of a one-connection pool."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, record: Any) -> None:
        self.queries.append(record.query)

    async def since(self, mark: int) -> list[str]:
        await anyio.lowlevel.checkpoint()  # loggers run through call_soon
        return self.queries[mark:]


@pytest.fixture
async def one_conn_bus(eventbus_dsn: str, eventbus_schema: str) -> AsyncIterator[tuple[EventBus, Trips]]:
    trips = Trips()
    async with EventBus(eventbus_dsn, schema=eventbus_schema, pool_size=1) as bus:
        async with bus.pool.acquire() as conn:
            conn.add_query_logger(trips)  # stays on the connection after its release
            await conn.execute(f"CREATE TABLE {quote_schema(eventbus_schema)}.orders (id text PRIMARY KEY)")
        yield bus, trips


async def _lock_is_free(other: asyncpg.Connection) -> bool:
    """Whether another session can take the advisory lock :func:`_dirty` takes."""
    free = bool(await other.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY))
    if free:
        await other.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return free


async def _dirty(conn: Any) -> None:
    """Leave session state a reset must clear: a setting and a session-level advisory lock."""
    await conn.execute("SET application_name = 'dirty'")
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)


async def _assert_clean(bus: EventBus, listener: Listener) -> None:
    async with bus.pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_setting('application_name')") != "dirty"
    assert await _lock_is_free(listener.conn)


async def test_commit_reset_and_wake_up_are_one_round_trip(
    one_conn_bus: tuple[EventBus, Trips], listener: Listener
) -> None:
    bus, trips = one_conn_bus
    mark = len(trips.queries)
    async with bus.transaction() as tx:
        await tx.connection.execute(f"INSERT INTO {quote_schema(bus.schema)}.orders VALUES ('o-1')")
        await tx.publish(Shipped("o-1"))
        await _dirty(tx.connection)
    sent = await trips.since(mark)
    assert [q.split()[0].rstrip(";") for q in sent] == ["BEGIN", "INSERT", "INSERT", "SET", "SELECT", "COMMIT"], sent
    assert "RESET ALL" in sent[-1] and "pg_notify" in sent[-1], sent[-1]
    assert await listener.settle() == 1
    await _assert_clean(bus, listener)


async def test_bus_statements_skip_the_reset(one_conn_bus: tuple[EventBus, Trips]) -> None:
    bus, trips = one_conn_bus
    mark = len(trips.queries)
    for _ in range(3):
        await bus.outbox.counts()
    sent = await trips.since(mark)
    assert len(sent) == 3 and all("RESET ALL" not in q for q in sent), sent


async def test_a_connection_a_user_acquired_is_reset(one_conn_bus: tuple[EventBus, Trips], listener: Listener) -> None:
    bus, _ = one_conn_bus
    async with bus.pool.acquire() as conn:
        await _dirty(conn)
    await _assert_clean(bus, listener)
    async with bus.pool.acquire() as conn, conn.transaction():  # a transaction of the user's: nothing folded
        await _dirty(conn)
        await bus.publish(Shipped("o-2"), connection=conn)
    await _assert_clean(bus, listener)
    assert await listener.settle() == 1  # woken from inside that transaction


async def test_rollback_sends_no_wake_up_and_resets(one_conn_bus: tuple[EventBus, Trips], listener: Listener) -> None:
    bus, _ = one_conn_bus
    with pytest.raises(RuntimeError, match="abort"):
        async with bus.transaction() as tx:
            await tx.publish(Shipped("o-1"))
            await _dirty(tx.connection)
            raise RuntimeError("abort")
    assert await listener.settle() == 0
    await _assert_clean(bus, listener)
    assert await bus.outbox.unsettled() == 0


async def test_a_failing_commit_raises_sends_no_wake_up_and_resets(
    one_conn_bus: tuple[EventBus, Trips], listener: Listener
) -> None:
    bus, _ = one_conn_bus
    s = quote_schema(bus.schema)
    async with bus.pool.acquire() as conn:
        await conn.execute(f"""
            CREATE TABLE {s}.lines (
                order_id text REFERENCES {s}.orders (id) DEFERRABLE INITIALLY DEFERRED
            )
        """)  # fmt: skip
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        async with bus.transaction() as tx:
            await tx.connection.execute(f"INSERT INTO {s}.lines VALUES ('no such order')")  # fails at COMMIT
            await tx.publish(Shipped("o-1"))
            await _dirty(tx.connection)
    assert await listener.settle() == 0
    await _assert_clean(bus, listener)
    assert await bus.outbox.unsettled() == 0

    async with bus.transaction() as tx:  # the connection is usable and folds again
        await tx.publish(Shipped("o-2"))
    assert await listener.settle() == 1
    assert await bus.outbox.unsettled() == 1


async def test_savepoints_inside_a_bus_transaction(one_conn_bus: tuple[EventBus, Trips], listener: Listener) -> None:
    bus, _ = one_conn_bus
    async with bus.transaction() as tx:
        await tx.publish(Shipped("kept"))
        with pytest.raises(RuntimeError):
            async with tx.connection.transaction():  # a savepoint
                await tx.publish(Shipped("rolled back"))
                raise RuntimeError
        async with tx.connection.transaction():
            await tx.publish(Shipped("released"))
    assert await listener.settle() == 1
    rows = await bus.pool.fetch(f"SELECT payload->>'order_id' AS o FROM {quote_schema(bus.schema)}.eventbus_outbox")
    assert sorted(r["o"] for r in rows) == ["kept", "released"]
