"""A property-based replay test of the orders example — copy it next to your own handlers.

    pytest examples/replay_test.py

``assert_replay_safe`` builds the service's bus on a fresh schema per example, publishes random orders (some
transactions roll back), makes the handlers raise or time out on random attempts, delivers some events twice
(what a relay crash between the handler's commit and the outbox update does) and replays dead letters. Then it
checks eventbus's invariants and the service's own rule below. A failure prints the shrunk history in words.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from eventbus.testing import assert_replay_safe, events_of
from examples.orders.app import OrderPlaced, build_bus, setup

INITIAL = {"widget": 10, "gadget": 4}

orders = events_of(
    OrderPlaced,
    order_id=st.sampled_from(["o-1", "o-2", "o-3", "o-4"]),
    sku=st.sampled_from(sorted(INITIAL)),
    quantity=st.integers(1, 3),
    email=st.just("ada@example.com"),
)


async def stock_is_conserved_and_reserved_once(conn: Any, committed: list[OrderPlaced]) -> None:
    """Stock neither appears nor vanishes, and no order reserves more than it asked for."""
    rows = await conn.fetch("SELECT sku, available, reserved FROM shop_stock")
    for row in rows:
        assert row["available"] + row["reserved"] == INITIAL[row["sku"]], f"stock of {row['sku']} changed: {row}"
        asked = sum(e.quantity for e in committed if e.sku == row["sku"])
        assert row["reserved"] <= asked, f"{row['reserved']} {row['sku']}s reserved for orders asking {asked}"


def test_orders_are_replay_safe() -> None:
    assert_replay_safe(
        lambda dsn, schema: build_bus(dsn, schema),
        events=orders,
        setup=setup,
        check=stock_is_conserved_and_reserved_once,
        max_examples=15,
    )
