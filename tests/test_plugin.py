"""The pytest plugin's fixtures work from sync tests and from async ones, and leave no schema behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


async def _value(dsn: str, query: str, *args: object) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def _tables(dsn: str, schema: str) -> int:
    return int(await _value(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = $1", schema))


def test_the_schema_fixture_serves_a_sync_test(eventbus_dsn: str, eventbus_schema: str) -> None:
    assert anyio.run(_tables, eventbus_dsn, eventbus_schema) > 0  # migrated
    assert anyio.run(_round_trip, eventbus_dsn, eventbus_schema) == ["ada"]


@pytest.mark.anyio
async def test_the_schema_fixture_serves_an_async_test(eventbus_dsn: str, eventbus_schema: str) -> None:
    assert await _tables(eventbus_dsn, eventbus_schema) > 0
    assert await _round_trip(eventbus_dsn, eventbus_schema) == ["ada"]


def test_the_schema_fixture_drops_its_schema_afterwards(eventbus_dsn: str, tmp_path: Path) -> None:
    """An inner pytest run, as a user's project runs the plugin: its test's schema is gone once the run ends."""
    seen = tmp_path / "schema.txt"
    (tmp_path / "test_inner.py").write_text(
        "def test_inner(eventbus_schema):\n"
        f"    open({str(seen)!r}, 'w').write(eventbus_schema)\n"
    )
    env = {**os.environ, "EVENTBUS_TEST_DSN": eventbus_dsn}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    schema = seen.read_text()
    assert schema and anyio.run(_exists, eventbus_dsn, schema) is False


async def _exists(dsn: str, schema: str) -> bool:
    return bool(await _value(dsn, "SELECT to_regnamespace($1) IS NOT NULL", schema))
