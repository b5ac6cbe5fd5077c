from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from eventbus import EventBus


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def bus(eventbus_dsn: str, eventbus_schema: str) -> AsyncIterator[EventBus]:
    """A started bus (no relay) on a fresh schema."""
    async with EventBus(eventbus_dsn, schema=eventbus_schema) as started:
        yield started
