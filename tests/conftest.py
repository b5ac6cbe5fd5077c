from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from listening import Listener

from eventbus import EventBus


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def bus(eventbus_dsn: str, eventbus_schema: str) -> AsyncIterator[EventBus]:
    """A started bus (no relay) on a fresh schema."""
    async with EventBus(eventbus_dsn, schema=eventbus_schema) as started:
        yield started


@pytest.fixture
async def listener(eventbus_dsn: str, eventbus_schema: str) -> AsyncIterator[Listener]:
    """A LISTEN on the wake-up channel of the test's schema."""
    conn = await asyncpg.connect(eventbus_dsn)
    result = Listener(conn, f"eventbus_{eventbus_schema}")
    await conn.add_listener(result.channel, result.on_notify)
    try:
        yield result
    finally:
        await conn.close()
