"""pytest plugin (registered through the ``pytest11`` entry point): real-PostgreSQL fixtures for eventbus.

- ``eventbus_dsn`` (session): ``EVENTBUS_TEST_DSN`` when set, else an embedded PostgreSQL in a temporary folder.
- ``eventbus_schema``: a fresh, migrated schema for one test, dropped afterwards.

Both are plain (sync) fixtures, so sync tests and async ones (``@pytest.mark.anyio``, or pytest-asyncio) take
them alike.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

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


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run ``coroutine`` to its end on an event loop of its own, in a thread of its own: whatever loop the test's
    own thread has (or is about to run) is left alone."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coroutine)
        except BaseException as exc:  # handed to the fixture's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="eventbus-schema")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


@pytest.fixture
def eventbus_schema(eventbus_dsn: str) -> Iterator[str]:
    import asyncpg

    from .migrations import migrate
    from .sql import quote_schema

    schema = f"t_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(eventbus_dsn)
        try:
            await migrate(conn, schema)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(eventbus_dsn)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {quote_schema(schema)} CASCADE")
        finally:
            await conn.close()

    _run(create())
    try:
        yield schema
    finally:
        _run(drop())
