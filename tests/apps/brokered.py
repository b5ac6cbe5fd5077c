"""An application for tests/test_nats.py: `eventbus relay --app tests.apps.brokered:bus --nats URL` forwards its
events, `eventbus consume --app tests.apps.brokered:bus --nats URL` handles them; a transactional subscriber
records each effect in a table of the schema, and an ordered one the order it handles each key's events in."""

from __future__ import annotations

import os

import anyio
import msgspec

from eventbus import Backoff, Context, EventBus, RelayConfig


class Order(msgspec.Struct, frozen=True):
    n: int


bus = EventBus(
    os.environ["BROKERED_DSN"], schema=os.environ["BROKERED_SCHEMA"], migrate=False, stop_timeout=2,
    relay_config=RelayConfig(poll_interval=0.05, heartbeat_interval=0.2),
)  # fmt: skip


@bus.subscribe(name="effects", transactional=True, concurrency=4, max_attempts=3, backoff=Backoff(0.02, jitter=0))
async def effects(event: Order, ctx: Context) -> None:
    if event.n % 10 == 9 and ctx.attempt == 1:
        raise ConnectionError(f"order {event.n} fails once")
    await anyio.sleep(0.005)  # long enough that a kill can land mid-handler
    await ctx.connection.execute(
        f'INSERT INTO "{bus.schema}".effects (event_id, n, pid) VALUES ($1, $2, $3)', ctx.event_id, event.n,
        os.getpid(),
    )  # fmt: skip


@bus.subscribe(name="sequencer", ordered=True, transactional=True, concurrency=4, max_attempts=5, backoff=0.02)
async def sequencer(event: Order, ctx: Context) -> None:
    """Records each key's events in the order it handles them (the serial column), once each."""
    await ctx.connection.execute(
        f'INSERT INTO "{bus.schema}".sequence (key, n) VALUES ($1, $2)', ctx.key, event.n
    )


@bus.subscribe(name="rejects", max_attempts=1)
async def rejects(event: Order) -> None:
    if event.n % 5 == 0:
        raise ValueError(f"order {event.n} is refused")
