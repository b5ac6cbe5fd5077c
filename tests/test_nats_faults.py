"""Faults of the NATS topology, against a NATS server of the test's own: the server restarted and stopped for 10 s
while producers, a relay process and two consumer processes run; a consumer killed with SIGKILL mid-handler.
After each: nothing lost, one effect per event for the transactional subscriber, every dead letter with its
reason, and delivery resumed soon after the server came back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import asyncpg
import msgspec
import pytest
from nats_server import OwnNats

from eventbus import EventBus
from eventbus.sql import quote_schema

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parent.parent
EVENTS = 300


class Order(msgspec.Struct, frozen=True):
    """The topic tests/apps/brokered.py handles."""

    n: int


def _spawn(command: str, url: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "eventbus.cli", command, "--app", "tests.apps.brokered:bus", "--nats", url],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip


@asynccontextmanager
async def _topology(dsn: str, schema: str, url: str, root: Path) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """A relay process and two consumer processes of tests/apps/brokered.py; stopped with SIGTERM at the end."""
    env = {**os.environ, "BROKERED_DSN": dsn, "BROKERED_SCHEMA": schema, "PYTHONPATH": str(ROOT)}
    logs = [root / "relay.log", root / "consumer-1.log", root / "consumer-2.log"]
    children = [_spawn("relay", url, env, logs[0]), _spawn("consume", url, env, logs[1]),
                _spawn("consume", url, env, logs[2])]  # fmt: skip
    try:
        yield children
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(timeout=30)


async def _effects(conn: asyncpg.Connection, schema: str) -> tuple[int, int]:
    """(rows, distinct events) of the transactional subscriber's effects."""
    row = await conn.fetchrow(f"SELECT count(*) AS rows, count(DISTINCT event_id) AS events FROM {schema}.effects")
    assert row is not None
    return int(row["rows"]), int(row["events"])


async def _publish(dsn: str, schema: str, numbers: range, spacing: float) -> None:
    async with EventBus(dsn, schema=schema, relay=False) as producer:
        for first in range(numbers.start, numbers.stop, 10):
            async with producer.transaction() as tx:
                await tx.publish_many([Order(n) for n in range(first, min(numbers.stop, first + 10))])
            await anyio.sleep(spacing)


async def _all_handled(
    conn: asyncpg.Connection, dsn: str, schema: str, children: list[subprocess.Popen[bytes]]
) -> None:
    with anyio.fail_after(90):
        while (await _effects(conn, quote_schema(schema)))[1] < EVENTS:
            assert sum(child.poll() is None for child in children) >= 2, "the relay or every consumer died"
            await anyio.sleep(0.1)
    async with EventBus(dsn, schema=schema, relay=False) as reader:
        await reader.drain(60)
        with anyio.fail_after(30):
            while sum((await reader.dead_letters.count()).values()) < EVENTS // 5:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        assert await reader.dead_letters.count() == {("DeliveryFailed", "rejects"): EVENTS // 5}


@pytest.fixture
async def effects_table(eventbus_dsn: str, eventbus_schema: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(eventbus_dsn)
    await conn.execute(f"CREATE TABLE {quote_schema(eventbus_schema)}.effects (event_id uuid, n int, pid int)")
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize("down_for", [0.0, 10.0], ids=["restart", "down-10s"])
async def test_the_server_restarting_under_load_loses_nothing_and_delivery_resumes(
    eventbus_dsn: str, eventbus_schema: str, effects_table: asyncpg.Connection, tmp_path: Path, down_for: float
) -> None:
    schema, conn = quote_schema(eventbus_schema), effects_table
    server = OwnNats(tmp_path)
    server.start()
    try:
        async with _topology(eventbus_dsn, eventbus_schema, server.url, tmp_path) as children:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_publish, eventbus_dsn, eventbus_schema, range(EVENTS), 0.05)
                with anyio.fail_after(60):
                    while (await _effects(conn, schema))[1] < 50:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                server.stop()
                await anyio.sleep(down_for)
                before = (await _effects(conn, schema))[1]
                server.start()
                back = time.monotonic()
                with anyio.fail_after(30):
                    while (await _effects(conn, schema))[1] == before and before < EVENTS:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                resumed = time.monotonic() - back
                print(f"delivery resumed {resumed:.2f} s after the server came back ({before} of {EVENTS} handled)")
            await _all_handled(conn, eventbus_dsn, eventbus_schema, children)
        rows, events = await _effects(conn, schema)
    finally:
        server.stop()
    assert (rows, events) == (EVENTS, EVENTS), "one effect per event"
    assert before == EVENTS or resumed < 2.0, f"delivery resumed {resumed:.2f} s after the server came back"


async def test_a_consumer_killed_mid_handler_loses_nothing(
    eventbus_dsn: str, eventbus_schema: str, effects_table: asyncpg.Connection, nats_stream: str, tmp_path: Path
) -> None:
    schema, conn = quote_schema(eventbus_schema), effects_table
    async with _topology(eventbus_dsn, eventbus_schema, nats_stream, tmp_path) as children:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_publish, eventbus_dsn, eventbus_schema, range(EVENTS), 0.02)
            with anyio.fail_after(60):
                while (await _effects(conn, schema))[1] < 80:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            children[1].kill()  # SIGKILL: its messages in hand come back after their ack wait
        await _all_handled(conn, eventbus_dsn, eventbus_schema, children)
    rows, events = await _effects(conn, schema)
    assert (rows, events) == (EVENTS, EVENTS), "one effect per event"
