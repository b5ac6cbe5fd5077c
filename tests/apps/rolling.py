"""An application for tests/test_upgrades.py, run by this release and by the release before it side by side: a
transactional subscriber records each effect, with the process that made it, in a table of the schema;
``python -m tests.apps.rolling FIRST COUNT`` publishes events ``FIRST`` to ``FIRST + COUNT - 1``."""

from __future__ import annotations

import os
import sys

import anyio
import msgspec

from eventbus import Context, EventBus, RelayConfig


class Rolled(msgspec.Struct, frozen=True):
    n: int


bus = EventBus(
    os.environ["ROLLING_DSN"], schema=os.environ["ROLLING_SCHEMA"], migrate=False, stop_timeout=2,
    relay_config=RelayConfig(poll_interval=0.05, heartbeat_interval=0.2, lease=5.0),
)  # fmt: skip


@bus.subscribe(name="rolled", transactional=True, concurrency=4)
async def rolled(event: Rolled, ctx: Context) -> None:
    await ctx.connection.execute(
        f'INSERT INTO "{bus.schema}".effects (event_id, n, pid) VALUES ($1, $2, $3)', ctx.event_id, event.n,
        os.getpid(),
    )  # fmt: skip


async def publish(first: int, count: int) -> None:
    async with EventBus(bus.dsn, schema=bus.schema, migrate=False, relay=False) as producer:
        for n in range(first, first + count):
            async with producer.transaction() as tx:
                await tx.publish(Rolled(n), key=f"k{n % 5}")
            await anyio.sleep(0.005)


if __name__ == "__main__":
    anyio.run(publish, int(sys.argv[1]), int(sys.argv[2]))
