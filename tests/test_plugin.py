"""The pytest plugin's fixtures work from sync tests and from async ones."""

from __future__ import annotations

import anyio
import asyncpg
import msgspec
import pytest

from eventbus import EventBus, RelayConfig


class Hello(msgspec.Struct, frozen=True):
    name: str


async def _round_trip(dsn: str, schema: str) -> list[str]:
    bus = EventBus(dsn, schema=schema, migrate=False, relay_config=RelayConfig(poll_interval=0.05))
    seen: list[str] = []

    @bus.subscribe(name="greeter")
    async def greet(event: Hello) -> None:
        seen.append(event.name)

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish(Hello("ada"))
        await bus.drain(timeout=30)
    return seen


async def _tables(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema))
    finally:
        await conn.close()


def test_the_schema_fixture_serves_a_sync_test(eventbus_dsn: str, eventbus_schema: str) -> None:
    assert anyio.run(_tables, eventbus_dsn, eventbus_schema) > 0  # migrated
    assert anyio.run(_round_trip, eventbus_dsn, eventbus_schema) == ["ada"]


@pytest.mark.anyio
async def test_the_schema_fixture_serves_an_async_test(eventbus_dsn: str, eventbus_schema: str) -> None:
    assert await _tables(eventbus_dsn, eventbus_schema) > 0
    assert await _round_trip(eventbus_dsn, eventbus_schema) == ["ada"]
