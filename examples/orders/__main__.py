"""Place a few orders, wait until every event is handled, then show the stock and the dead letters.

python -m examples.orders               # handlers run in this process
python -m examples.orders --no-relay    # only place orders; a separate `eventbus relay` delivers them
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import anyio

from eventbus import DeadLetterFilter

from .app import bus, place_order, setup

ORDERS = [
    ("widget", 2, "ada@example.com"),
    ("gadget", 1, "grace@example.com"),
    ("widget", 3, "linus@example.com"),
    ("gadget", 9, "barbara@example.com"),  # more gadgets than the shelf holds: this one ends out_of_stock
]


async def main(relay: bool) -> None:
    bus.run_relay = relay
    started = datetime.now(UTC)
    async with bus:
        async with bus.transaction() as tx:
            await setup(tx.connection)

        placed = [await place_order(sku, quantity, email) for sku, quantity, email in ORDERS]
        print(f"placed {len(placed)} orders: {', '.join(placed)}")
        if not relay:
            print("waiting for a relay (start one with: eventbus relay --app examples.orders.app:bus)")
        await bus.drain(timeout=60)

        orders = await bus.pool.fetch("SELECT id, sku, quantity, status FROM shop_orders WHERE id = ANY($1)", placed)
        stock = await bus.pool.fetch("SELECT sku, available, reserved FROM shop_stock ORDER BY sku")
        letters = await bus.dead_letters.list(DeadLetterFilter(since=started))
        waiting = sum((await bus.dead_letters.count()).values())

    print("\norders (status set by reserve_stock, in the same transaction as the stock change):")
    for row in sorted(orders, key=lambda r: placed.index(r["id"])):
        print(f"  {row['id']}  {row['quantity']} x {row['sku']:<7} {row['status']}")
    if any(row["status"] == "out_of_stock" for row in orders):
        print("  (out_of_stock: not enough left on the shelf, so nothing was reserved for that order)")
    print("\nstock:")
    for row in stock:
        print(f"  {row['sku']:<7} available {row['available']:>3}   reserved {row['reserved']:>3}")
    print("\nthe mail server is down, so these confirmations were dead-lettered after 3 attempts each:")
    for letter in letters:
        print(f"  {letter.id}  {letter.reason}  {letter.subscriber}  order {letter.key}: {letter.error}")
    print(
        f"\n{waiting} dead letters wait in schema 'orders' in all; see them with `eventbus dlq list --schema orders`."
        "\nOnce mail works again, replay them (each is re-sent to send_confirmation_email alone):"
        "\n    await bus.dead_letters.replay(DeadLetterFilter(subscriber='orders.send_confirmation_email'))"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m examples.orders", description=__doc__.splitlines()[0])
    parser.add_argument("--no-relay", action="store_true", help="leave delivery to a separate `eventbus relay`")
    anyio.run(main, not parser.parse_args().no_relay)
