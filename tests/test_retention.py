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
