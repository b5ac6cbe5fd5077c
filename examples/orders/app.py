"""The order service's events and handlers, and ``bus``, which ``eventbus relay`` can run in a worker process::

    eventbus relay --app examples.orders.app:bus

The bus uses ``EVENTBUS_DSN`` when set, else the embedded PostgreSQL in ``./.eventbus``. eventbus keeps its tables
in the schema ``orders``; the service's own tables (``shop_orders``, ``shop_stock``) are found on the connection's
search_path (``public`` by default), which is how ``examples/replay_test.py`` gives each test run its own copy.
"""

from __future__ import annotations

import secrets

import asyncpg
import msgspec

from eventbus import Backoff, Context, EventBus, topic

__all__ = ["OrderPlaced", "build_bus", "bus", "place_order", "reserve_stock", "send_confirmation_email", "setup"]

#: Quick retries so that the example finishes in seconds (the default starts at 1 s and doubles up to 5 min).
QUICK = Backoff(initial=0.1, factor=2, maximum=1, jitter=0.1)


@topic("orders.placed")
class OrderPlaced(msgspec.Struct, frozen=True):
    order_id: str
    sku: str
    quantity: int
    email: str


async def setup(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    """Create the service's tables (once) and restock the shelves to at least 10 widgets and 4 gadgets."""
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS shop_stock (
            sku       text PRIMARY KEY,
            available int  NOT NULL CHECK (available >= 0),
            reserved  int  NOT NULL DEFAULT 0
        );
        CREATE TABLE IF NOT EXISTS shop_orders (
            id       text PRIMARY KEY,
            sku      text NOT NULL REFERENCES shop_stock (sku),
            quantity int  NOT NULL CHECK (quantity > 0),
            email    text NOT NULL,
            status   text NOT NULL DEFAULT 'placed'
        );
        INSERT INTO shop_stock (sku, available) VALUES ('widget', 10), ('gadget', 4)
        ON CONFLICT (sku) DO UPDATE SET available = greatest(shop_stock.available, EXCLUDED.available);
        """
    )


async def place_order(sku: str, quantity: int, email: str) -> str:
    """Save an order and announce it, in one transaction: both happen, or neither does."""
    order_id = f"o-{secrets.token_hex(3)}"
    async with bus.transaction() as tx:
        await tx.connection.execute(
            "INSERT INTO shop_orders (id, sku, quantity, email) VALUES ($1, $2, $3, $4)", order_id, sku, quantity, email
        )
        await tx.publish(OrderPlaced(order_id, sku, quantity, email), key=order_id)
    return order_id


async def reserve_stock(event: OrderPlaced, ctx: Context) -> None:
    """Move stock from available to reserved, or mark the order out of stock.

    Transactional: these writes commit together with this delivery's inbox row, so a redelivered or replayed
    event never reserves twice. Ordered: events with the same key (the order id) are handled one at a time, in
    publish order.
    """
    reserved = await ctx.connection.fetchval(
        "UPDATE shop_stock SET available = available - $2, reserved = reserved + $2"
        " WHERE sku = $1 AND available >= $2 RETURNING true",
        event.sku,
        event.quantity,
    )
    await ctx.connection.execute(
        "UPDATE shop_orders SET status = $2 WHERE id = $1", event.order_id, "reserved" if reserved else "out_of_stock"
    )


class MailServerDown(Exception):
    pass


async def send_confirmation_email(event: OrderPlaced, ctx: Context) -> None:
    """Simulates a mail outage: every attempt fails. After 3 attempts the delivery is dead-lettered."""
    raise MailServerDown(f"smtp.example.com refused the connection (attempt {ctx.attempt}, to {event.email})")


def build_bus(dsn: str | None = None, schema: str = "orders") -> EventBus:
    """The service's bus with its two subscribers (a function, so that tests can build one per database)."""
    new = EventBus(dsn, schema=schema)
    new.subscribe(
        name="orders.reserve_stock", transactional=True, ordered=True, timeout=5, max_attempts=5, backoff=QUICK
    )(reserve_stock)
    new.subscribe(name="orders.send_confirmation_email", timeout=2, max_attempts=3, backoff=QUICK)(
        send_confirmation_email
    )
    return new


bus = build_bus()
