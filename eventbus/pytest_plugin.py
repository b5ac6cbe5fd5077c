"""pytest plugin (registered through the ``pytest11`` entry point): real-PostgreSQL fixtures for eventbus.

- ``eventbus_dsn`` (session): ``EVENTBUS_TEST_DSN`` when set, else an embedded PostgreSQL in a temporary folder.
- ``eventbus_schema``: a fresh, migrated schema for one test, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def eventbus_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    dsn = os.environ.get("EVENTBUS_TEST_DSN")
    if dsn:
        yield dsn
        return
    from ._embedded import _start

    data_dir: Path = tmp_path_factory.mktemp("eventbus-embedded")
    yield _start(data_dir)


@pytest.fixture
async def eventbus_schema(eventbus_dsn: str) -> AsyncIterator[str]:
    import asyncpg

    from .migrations import migrate
    from .sql import quote_schema

    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        await migrate(conn, schema)
    finally:
        await conn.close()
    yield schema
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {quote_schema(schema)} CASCADE")
    finally:
        await conn.close()
