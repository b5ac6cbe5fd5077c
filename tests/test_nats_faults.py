"""Faults of the NATS topology, against a NATS server of the test's own: the server restarted and stopped for 10 s
while producers, a relay process and two consumer processes run; a consumer killed with SIGKILL mid-handler.
After each: nothing lost, one effect per event for the transactional subscriber, every dead letter with its
reason, and delivery resumed soon after the server came back."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import asyncpg
import pytest
from brokered import ROOT, Order, spawn
from nats_server import OwnNats

from eventbus import EventBus
from eventbus.sql import quote_schema

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.subprocess]

EVENTS = 300




@asynccontextmanager
async def _topology(dsn: str, schema: str, url: str, root: Path) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """A relay process and two consumer processes of tests/apps/brokered.py; stopped with SIGTERM at the end."""
    env = {**os.environ, "BROKERED_DSN": dsn, "BROKERED_SCHEMA": schema, "PYTHONPATH": str(ROOT)}
    logs = [root / "relay.log", root / "consumer-1.log", root / "consumer-2.log"]
    children = [spawn("relay", url, env, logs[0]), spawn("consume", url, env, logs[1]),
                spawn("consume", url, env, logs[2])]  # fmt: skip
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
    """Ten events per transaction, over seven keys, one transaction every ``spacing`` seconds."""
    async with EventBus(dsn, schema=schema, relay=False) as producer:
        for first in range(numbers.start, numbers.stop, 10):
            async with producer.transaction() as tx:
                await tx.offer([producer.encode(Order(n), key=f"k{n % 7}")
                                for n in range(first, min(numbers.stop, first + 10))])  # fmt: skip
            await anyio.sleep(spacing)


async def _in_key_order(conn: asyncpg.Connection, schema: str) -> None:
    """The ordered subscriber handled every event once, each key's in the order they were published."""
    rows = await conn.fetch(f"SELECT key, n FROM {schema}.sequence ORDER BY id")
    assert sorted(row["n"] for row in rows) == list(range(EVENTS)), "each event once"
    by_key: dict[str, list[int]] = {}
    for row in rows:
        by_key.setdefault(row["key"], []).append(row["n"])
    for key, numbers in by_key.items():
        assert numbers == sorted(numbers), f"key {key} out of order: {numbers}"


async def _all_handled(
    conn: asyncpg.Connection, dsn: str, schema: str, children: list[subprocess.Popen[bytes]]
) -> None:
    quoted = quote_schema(schema)
    with anyio.fail_after(90):
        # The ordered subscriber too: messages its consumers had in hand at the fault come back after their ack
        # wait, holding up their partitions meanwhile.
        while (await _effects(conn, quoted))[1] < EVENTS or (
            await conn.fetchval(f"SELECT count(*) FROM {quoted}.sequence") < EVENTS
        ):
            assert sum(child.poll() is None for child in children) >= 2, "the relay or every consumer died"
            await anyio.sleep(0.1)
    async with EventBus(dsn, schema=schema, relay=False) as reader:
        await reader.drain(60)
        with anyio.fail_after(30):
            while sum((await reader.dead_letters.count()).values()) < EVENTS // 5:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        letters = await reader.dead_letters.list(limit=1000)
        twice = [d for d in letters if sum(e.event_id == d.event_id for e in letters) > 1]
        assert not twice, [(d.event_id, d.outbox_id, d.error_type, d.attempts) for d in twice]
        assert await reader.dead_letters.count() == {("DeliveryFailed", "rejects"): EVENTS // 5}


@pytest.fixture
async def effects_table(eventbus_dsn: str, eventbus_schema: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(eventbus_dsn)
    await conn.execute(f"CREATE TABLE {quote_schema(eventbus_schema)}.effects (event_id uuid, n int, pid int)")
    await conn.execute(f"CREATE TABLE {quote_schema(eventbus_schema)}.sequence (id bigserial, key text, n int)")
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
        await _in_key_order(conn, schema)
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
    await _in_key_order(conn, schema)


class _Proxy:
    """A TCP proxy of the test's own in front of the NATS server, whose connections the test can cut."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.cut_scopes: set[anyio.CancelScope] = set()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        async with listener:
            await listener.serve(self._pipe)

    async def _pipe(self, client: anyio.abc.SocketStream) -> None:
        with anyio.CancelScope() as scope:
            self.cut_scopes.add(scope)
            upstream = await anyio.connect_tcp("127.0.0.1", self.target)
            async with client, upstream, anyio.create_task_group() as tg:
                tg.start_soon(self._copy, client, upstream)
                tg.start_soon(self._copy, upstream, client)
        self.cut_scopes.discard(scope)

    @staticmethod
    async def _copy(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            async for chunk in source:
                await sink.send(chunk)

    def cut(self) -> int:
        """Drop every connection through the proxy (new ones are accepted); return how many."""
        scopes = list(self.cut_scopes)
        for scope in scopes:
            scope.cancel()
        return len(scopes)


async def test_consumers_whose_connection_drops_reconnect_and_lose_nothing(
    eventbus_dsn: str, eventbus_schema: str, effects_table: asyncpg.Connection, tmp_path: Path
) -> None:
    schema, conn = quote_schema(eventbus_schema), effects_table
    server = OwnNats(tmp_path)
    server.start()
    try:
        async with anyio.create_task_group() as proxying:
            proxy = _Proxy(server.port)
            await proxying.start(proxy.serve)
            env = {**os.environ, "BROKERED_DSN": eventbus_dsn, "BROKERED_SCHEMA": eventbus_schema,
                   "PYTHONPATH": str(ROOT)}  # fmt: skip
            through = f"nats://127.0.0.1:{proxy.port}"
            children = [spawn("relay", server.url, env, tmp_path / "relay.log"),
                        spawn("consume", through, env, tmp_path / "consumer-1.log"),
                        spawn("consume", through, env, tmp_path / "consumer-2.log")]  # fmt: skip
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_publish, eventbus_dsn, eventbus_schema, range(EVENTS), 0.03)
                    with anyio.fail_after(60):
                        while (await _effects(conn, schema))[1] < 60:  # noqa: ASYNC110
                            await anyio.sleep(0.02)
                    assert proxy.cut() >= 2, "both consumers were connected through the proxy"
                    await anyio.sleep(1.0)
                    proxy.cut()
                await _all_handled(conn, eventbus_dsn, eventbus_schema, children)
            finally:
                for child in children:
                    child.send_signal(signal.SIGTERM)
                for child in children:
                    child.wait(timeout=30)
                proxying.cancel_scope.cancel()
        rows, events = await _effects(conn, schema)
        await _in_key_order(conn, schema)
    finally:
        server.stop()
    assert (rows, events) == (EVENTS, EVENTS), "one effect per event"
