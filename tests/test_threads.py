"""Plain ``def`` handlers run on daemon threads, a bounded pool per subscriber: a hung one never keeps a relay
process from exiting, abandoned threads are counted and do not pile up, and ``ordered=True`` is refused for them.

Scenarios that broke on 0.2.0 before: ``eventbus relay`` printed "stopped" after SIGTERM and was still running
20 s later (anyio's worker threads are not daemons); each timed-out attempt took another thread (1 -> 9 after 10
attempts); ``ordered=True`` was accepted for a ``def`` handler whose abandoned thread ran beside the key's next
event.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from eventbus import EventBus, RegistrationError, RelayConfig

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent


class Stuck(msgspec.Struct, frozen=True):  # the topic of tests/apps/hung_def.py
    n: int


def _spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "eventbus.cli", "relay", "--app", "tests.apps.hung_def:bus"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip


@pytest.mark.subprocess
async def test_a_relay_with_a_hung_def_handler_exits_on_sigterm(
    eventbus_dsn: str, eventbus_schema: str, tmp_path: Path
) -> None:
    async with EventBus(eventbus_dsn, schema=eventbus_schema, relay=False) as bus, bus.transaction() as tx:
        await tx.publish_many([Stuck(n) for n in range(3)])
    env = {**os.environ, "HUNG_DSN": eventbus_dsn, "HUNG_SCHEMA": eventbus_schema, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "relay.log"
    child = _spawn(env, log)
    try:
        with anyio.fail_after(60):
            while b"handling" not in log.read_bytes():  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await anyio.sleep(1.0)  # attempts time out and their threads are abandoned
        child.send_signal(signal.SIGTERM)
        # Many times the stop timeout (0.5 s): a process that is stuck never gets there.
        code = await anyio.to_thread.run_sync(lambda: child.wait(30))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    text = log.read_text()
    assert code == 0, text
    assert "stopped" in text, text


async def test_abandoned_threads_are_counted_and_bounded(eventbus_dsn: str, eventbus_schema: str) -> None:
    """Each timed-out attempt abandons its thread until the subscriber's pool (twice its concurrency) is full;
    later attempts wait for a thread and time out without taking another one."""
    release = threading.Event()
    calls: list[int] = []
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=RelayConfig(poll_interval=0.05))

    @bus.subscribe(name="stuck", timeout=0.1, max_attempts=6, backoff=0.01, concurrency=1)
    def hang(event: Stuck) -> None:
        calls.append(event.n)
        release.wait(30)

    before = threading.active_count()
    try:
        async with bus:
            async with bus.transaction() as tx:
                await tx.publish(Stuck(1))
            await bus.drain(30)
            assert threading.active_count() - before <= 2, "at most twice the subscriber's concurrency"
            assert await bus.dead_letters.count() == {("HandlerTimeout", "stuck"): 1}
    finally:
        release.set()
    assert bus.statistics().abandoned_threads == 2
    assert calls == [1, 1], "two threads ran it; the other four attempts found no free thread"


def test_an_ordered_def_handler_is_refused() -> None:
    bus = EventBus("postgresql://localhost/unused")

    with pytest.raises(RegistrationError, match="async def"):

        @bus.subscribe(ordered=True)
        def handle(event: Stuck) -> None:
            time.sleep(0)
