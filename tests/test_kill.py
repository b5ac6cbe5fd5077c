"""kill -9 a relay process mid-batch: nothing is lost and no transactional effect happens twice (DESIGN
invariants 3 and 6). The relay is tests/apps/kill_relay.py, run as a child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from eventbus import EventBus, Status

pytestmark = [pytest.mark.anyio, pytest.mark.subprocess]

APP = Path(__file__).parent / "apps" / "kill_relay.py"
EVENTS = 300


class Numbered(msgspec.Struct, frozen=True):  # the same topic as tests/apps/kill_relay.py's
    n: int


@contextmanager
def relay_process(dsn: str, schema: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "KILL_DSN": dsn, "KILL_SCHEMA": schema, "KILL_LEASE": "1"}
    with log.open("wb") as out:
        child = subprocess.Popen([sys.executable, str(APP)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


async def test_sigkill_mid_batch_loses_nothing_and_doubles_nothing(
    eventbus_dsn: str, eventbus_schema: str, tmp_path: Path
) -> None:
    schema = f'"{eventbus_schema}"'
    async with EventBus(eventbus_dsn, schema=eventbus_schema, relay=False) as bus:
        await bus.pool.execute(f"CREATE TABLE {schema}.effects (event_id uuid NOT NULL, n int NOT NULL, pid int)")

        async def effects() -> int:
            return int(await bus.pool.fetchval(f"SELECT count(*) FROM {schema}.effects"))

        with relay_process(eventbus_dsn, eventbus_schema, tmp_path / "first.log") as first:
            async with bus.transaction() as tx:
                offered = await tx.offer([bus.encode(Numbered(n), key=f"k{n % 10}") for n in range(EVENTS)])
            event_ids = set(offered.inserted)
            assert len(event_ids) == EVENTS

            # Wait until the first relay has done some, but not all, of the work, then kill it without warning.
            with anyio.fail_after(120):
                while await effects() < 20:
                    assert first.poll() is None, (tmp_path / "first.log").read_text()
                    await anyio.sleep(0.01)
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            assert first.returncode == -signal.SIGKILL

        done_by_first = await effects()
        counts = await bus.outbox.counts()
        assert done_by_first < EVENTS, "the relay finished before it was killed; the test proves nothing"
        assert counts["claimed"] > 0, "nothing was claimed when the relay died"

        with relay_process(eventbus_dsn, eventbus_schema, tmp_path / "second.log") as second:
            try:
                await bus.drain(120)  # includes waiting for the killed relay's 1 s leases to run out
            except TimeoutError:
                pytest.fail(f"not drained; second relay's log:\n{(tmp_path / 'second.log').read_text()}")
            assert second.poll() is None

        rows = await bus.pool.fetch(f"SELECT event_id, count(*) AS n, min(pid) AS pid FROM {schema}.effects GROUP BY 1")
        per_event = {row["event_id"]: row["n"] for row in rows}
        assert set(per_event) == event_ids  # every event had its effect
        assert set(per_event.values()) == {1}  # and none twice
        assert {row["pid"] for row in rows} == {first.pid, second.pid}  # both relays did part of the work

        final = await bus.outbox.counts()
        assert (final["pending"], final["claimed"], final["dead"]) == (0, 0, 0)
        statuses = await bus.pool.fetch(f"SELECT DISTINCT status FROM {schema}.eventbus_outbox")
        assert [r["status"] for r in statuses] == [Status.RELAYED]
        assert await bus.dead_letters.count() == {}
