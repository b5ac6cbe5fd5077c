"""The application both processes load: `eventbus relay --app examples.nats.app:bus --nats URL` forwards its events
to JetStream, `eventbus consume --app examples.nats.app:bus --nats URL` runs its handlers."""

from __future__ import annotations

import msgspec

from eventbus import Context, EventBus


class OrderPlaced(msgspec.Struct, frozen=True):
    order_id: str
    total_cents: int


# EVENTBUS_DSN if set, else the embedded PostgreSQL in ./.eventbus; the schema keeps the example's tables apart.
bus = EventBus(schema="nats_example", stop_timeout=2)


@bus.subscribe(name="nats_example.bill", transactional=True)
async def bill(event: OrderPlaced, ctx: Context) -> None:
    """One invoice per order, written in the same transaction as the inbox row: exactly one effect."""
    await ctx.connection.execute(
        "INSERT INTO nats_example.invoices (order_id, cents) VALUES ($1, $2)", event.order_id, event.total_cents
    )


@bus.subscribe(name="nats_example.ship", ordered=True)
async def ship(event: OrderPlaced, ctx: Context) -> None:
    """Each order's events one at a time, in the order they were published."""
    print(f"shipping {event.order_id} (attempt {ctx.attempt})", flush=True)
