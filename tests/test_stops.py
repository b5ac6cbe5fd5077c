"""Clean stops: what finished is settled, what never started goes back with its attempt, what hangs is released
when the stop's timeout ends; ``start()`` and ``stop()`` work under a caller's cancel scope.

Scenarios that broke on 0.2.0 before: rows waiting in a mailbox lost an attempt at every stop (enough rolling
deploys during a backlog turned them into dead letters that never ran); ``await bus.start()`` inside
``anyio.fail_after(...)`` raised "Attempted to exit a cancel scope that isn't the current task's current cancel
scope".
"""

from __future__ import annotations

import anyio
import msgspec
import pytest

from eventbus import EventBus, RelayConfig
from eventbus.sql import quote_schema

pytestmark = pytest.mark.anyio

GIVE_UP = 30.0
FAST = RelayConfig(poll_interval=0.05, heartbeat_interval=0.2)


class Job(msgspec.Struct, frozen=True):
    n: int


async def rows(bus: EventBus, schema: str) -> dict[int, tuple[int, int]]:
    """Each event's outbox row: n -> (status, attempts)."""
    found = await bus.pool.fetch(
        f"SELECT (payload->>'n')::int AS n, status, attempts FROM {quote_schema(schema)}.eventbus_outbox"
    )
    return {r["n"]: (r["status"], r["attempts"]) for r in found}


async def test_a_stop_settles_what_finished_and_gives_waiting_rows_their_attempt_back(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=FAST, relay=True, stop_timeout=0.5)
    started: list[int] = []
    hanging = anyio.Event()

    @bus.subscribe(name="slow", concurrency=2)
    async def handle(event: Job) -> None:
        started.append(event.n)
        if event.n == 0:
            hanging.set()
            await anyio.sleep(3600)
        await anyio.sleep(0.05)

    await bus.connect()
    async with bus.transaction() as tx:
        await tx.publish_many([Job(n) for n in range(40)])
    await bus.start()
    with anyio.fail_after(GIVE_UP):
        await hanging.wait()
        while len(started) < 6:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    await bus.stop()
    await bus.connect()
    try:
        after = await rows(bus, eventbus_schema)
    finally:
        await bus.close()
    finished = [n for n in range(40) if after[n][0] == 2]
    assert after[0] == (0, 1), "the hung row is pending again at once, its attempt counted (it ran)"
    assert set(finished) >= set(started) - {0, started[-1]}, "what finished before the stop is settled"
    never_ran = [n for n in range(40) if n not in started]
    assert never_ran, "the stop came while rows waited"
    assert {after[n] for n in never_ran} == {(0, 0)}, "rows that never started are pending with no attempt used"


async def test_start_and_stop_work_under_a_callers_cancel_scope(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=FAST)
    seen: list[int] = []

    @bus.subscribe(name="audit")
    async def handle(event: Job) -> None:
        seen.append(event.n)

    with anyio.fail_after(GIVE_UP):
        await bus.start()
    async with bus.transaction() as tx:
        await tx.publish(Job(1))
    await bus.drain(GIVE_UP)
    with anyio.fail_after(GIVE_UP):
        await bus.stop()
    assert seen == [1]


async def test_a_bus_started_in_one_task_stops_from_another(eventbus_dsn: str, eventbus_schema: str) -> None:
    """As a web framework's startup and shutdown hooks do."""
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=FAST)

    @bus.subscribe(name="audit")
    async def handle(event: Job) -> None:
        pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(bus.start)
    async with bus.transaction() as tx:
        await tx.publish(Job(1))
    await bus.drain(GIVE_UP)
    async with anyio.create_task_group() as tg:
        tg.start_soon(bus.stop)
    assert bus.relay is not None and bus.relay.statistics().settled == 1
