"""A relay process for tests/test_kill.py: a transactional subscriber that records one effect row per event.

Run as ``python tests/apps/kill_relay.py`` with ``KILL_DSN`` and ``KILL_SCHEMA`` set (``KILL_LEASE``: lease
seconds, default 1). The module-level ``bus`` also suits ``eventbus relay --app``-style loaders.
"""

from __future__ import annotations

import os

import anyio
import msgspec

from eventbus import Context, EventBus, RelayConfig


class Numbered(msgspec.Struct, frozen=True):
    n: int


def make_bus(dsn: str, schema: str, lease: float = 1.0) -> EventBus:
    config = RelayConfig(poll_interval=0.05, lease=lease, reclaim_interval=0.2, heartbeat_interval=0.2, batch_size=64)
    bus = EventBus(dsn, schema=schema, migrate=False, relay_config=config, pool_size=6)
    table = f'"{schema}".effects'

    @bus.subscribe(name="effects", transactional=True, concurrency=4, max_attempts=10, timeout=30)
    async def record(event: Numbered, ctx: Context) -> None:
        await ctx.connection.execute(
            f"INSERT INTO {table} (event_id, n, pid) VALUES ($1, $2, $3)", ctx.event_id, event.n, os.getpid()
        )
        await anyio.sleep(0.02)  # slow enough that a kill lands mid-batch

    return bus


bus = make_bus(os.environ["KILL_DSN"], os.environ["KILL_SCHEMA"], float(os.environ.get("KILL_LEASE", "1")))


async def main() -> None:
    async with bus:
        print("relay started", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main)
