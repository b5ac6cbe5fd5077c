"""An application for tests/test_observability.py: `eventbus relay --app tests.apps.observed:bus --metrics-port 0`
serves /metrics while its handlers succeed, retry, dead-letter and publish follow-up events."""

from __future__ import annotations

import os

import msgspec

from eventbus import Backoff, Context, EventBus, RelayConfig


class Order(msgspec.Struct, frozen=True):
    n: int


class Receipt(msgspec.Struct, frozen=True):
    n: int


bus = EventBus(
    os.environ["OBSERVED_DSN"], schema=os.environ["OBSERVED_SCHEMA"], migrate=False, stop_timeout=2,
    relay_config=RelayConfig(poll_interval=0.05, heartbeat_interval=0.2, metrics_interval=0.1),
)  # fmt: skip


@bus.subscribe(name="receipts", max_attempts=2, backoff=Backoff(initial=0.01, jitter=0))
async def receipts(event: Order, ctx: Context) -> None:
    if event.n % 2:
        raise ValueError(f"order {event.n} is odd")
    await ctx.publish(Receipt(event.n), key=ctx.key)


@bus.subscribe(name="archive")
async def archive(event: Receipt) -> None:
    pass
