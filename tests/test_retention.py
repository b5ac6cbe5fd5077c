from __future__ import annotations

from datetime import timedelta

import anyio
import msgspec
import pytest

from eventbus import EventBus, RelayConfig

pytestmark = pytest.mark.anyio


class Tick(msgspec.Struct, frozen=True):
    n: int


async def test_relay_purges_relayed_rows_past_retention(eventbus_dsn: str, eventbus_schema: str) -> None:
    config = RelayConfig(
        poll_interval=0.02, heartbeat_interval=0.2, retention=timedelta(0), retention_interval=0.1, retention_batch=3
    )
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=config)
    handled: list[int] = []

    @bus.subscribe(name="tick")
    async def tick(event: Tick) -> None:
        handled.append(event.n)

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish_many([Tick(n) for n in range(10)])
        await bus.drain(timeout=30)
        for _ in range(600):  # up to 30 s
            if (await bus.outbox.counts())["relayed"] == 0:
                break
            await anyio.sleep(0.05)
        stats = bus.statistics().relay
        assert stats is not None and stats.purged == 10
        async with bus.transaction() as tx:  # rows still pending are never purged
            await tx.publish(Tick(99), delay=3600)
        await anyio.sleep(0.5)
        assert (await bus.outbox.counts())["pending"] == 1
    assert sorted(handled) == list(range(10))


class Only(msgspec.Struct, frozen=True):
    n: int


async def test_retention_covers_dead_rows_and_the_inbox(eventbus_dsn: str, eventbus_schema: str) -> None:
    """Dead outbox rows go (their dead letters hold the event), and so do inbox rows, except those of events
    whose dead letter is not replayed yet: a replay must still find a committed effect (0.2.0 before: the inbox
    and dead rows grew forever)."""
    config = RelayConfig(
        poll_interval=0.02, heartbeat_interval=0.2, retention=timedelta(0), retention_interval=0.1, retention_batch=2
    )
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=config)

    @bus.subscribe(name="tx", transactional=True)
    async def record(event: Tick, ctx: object) -> None:
        pass

    @bus.subscribe(name="boom", max_attempts=1)
    async def boom(event: Tick | Only) -> None:
        if event.n in (3, 9):
            raise RuntimeError("fails for good")

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish_many([Tick(n) for n in range(5)])
            await tx.publish(Only(9))  # only boom takes it: its row ends dead
        await bus.drain(timeout=30)
        inbox = f'"{eventbus_schema}".eventbus_inbox'
        with anyio.fail_after(30):
            while (await bus.outbox.counts())["relayed"] + (await bus.outbox.counts())["dead"]:  # noqa: ASYNC110
                await anyio.sleep(0.05)
            while await bus.pool.fetchval(f"SELECT count(*) FROM {inbox}") > 1:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        kept = await bus.pool.fetch(f"SELECT event_id FROM {inbox}")
        letters = await bus.dead_letters.list()
    assert sorted(letter.topic for letter in letters) == ["Only", "Tick"]
    (tick_letter,) = [letter for letter in letters if letter.topic == "Tick"]
    assert [r["event_id"] for r in kept] == [tick_letter.event_id], "the inbox row of the dead-lettered event stays"
