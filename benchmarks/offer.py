"""Producer throughput: transactions/s of "insert one business row + publish one event".

Ours: ``async with bus.transaction() as tx`` + an INSERT into a business table + ``tx.publish``. Baseline, same
run, same number of connections: raw asyncpg doing the same two inserts by hand, the event going into a plain
outbox-shaped table (UUIDv7 primary key, topic, key, jsonb payload and headers, created_at) with no other
index and no NOTIFY. A diagnostic third run adds ``pg_notify`` to the raw transaction, separating what the
commit-time NOTIFY costs (PostgreSQL serialises committing transactions that notify) from the rest. Every
worker loops for a fixed time; transactions finished in the window after a short warm-up are counted. The
runs take turns in short rounds in a rotating order on one schema; background load is not controlled.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

import anyio
import asyncpg
import msgspec

from eventbus import EventBus
from eventbus.ids import new_id
from eventbus.sql import quote_schema

from ._common import Outcome, Row, Settings, scratch_schema

NAME = "offer"
WARMUP = 0.3
ROUNDS = 6


class OrderPlaced(msgspec.Struct, frozen=True):
    order_id: str
    total_cents: int


def _ddl(schema: str) -> str:
    s = quote_schema(schema)
    return f"""
        CREATE TABLE {s}.bench_orders (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            order_id text NOT NULL,
            total_cents integer NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE {s}.bench_raw_outbox (
            id uuid PRIMARY KEY,
            topic text NOT NULL,
            key text,
            payload jsonb NOT NULL,
            headers jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            created_at timestamptz NOT NULL DEFAULT now()
        );
    """


async def _timed_loop(workers: int, duration: float, one: Any) -> dict[str, Any]:
    """Run ``one(worker, i)`` in ``workers`` tasks for ``duration`` s; count what finished after the warm-up."""
    start = perf_counter()
    measure_from = start + WARMUP
    end = measure_from + duration
    counted = 0
    errors = 0
    last_error = None

    async def loop(worker: int) -> None:
        nonlocal counted, errors, last_error
        i = 0
        while perf_counter() < end:
            try:
                await one(worker, i)
            except Exception as exc:
                errors += 1
                last_error = f"{type(exc).__name__}: {exc}"
                if errors > 100:
                    raise
            else:
                if perf_counter() >= measure_from:
                    counted += 1
            i += 1

    async with anyio.create_task_group() as tg:
        for w in range(workers):
            tg.start_soon(loop, w)
    return {"transactions": counted, "seconds": duration, "tx_per_s": counted / duration, "errors": errors,
            "last_error": last_error}  # fmt: skip


async def _ours(dsn: str, schema: str, connections: int, duration: float, *, notify: bool = True) -> dict[str, Any]:
    bus = EventBus(dsn, schema=schema, relay=False, migrate=False, pool_size=connections, notify=notify)
    insert = f"INSERT INTO {quote_schema(schema)}.bench_orders (order_id, total_cents) VALUES ($1, $2)"
    await bus.connect()
    try:

        async def one(worker: int, i: int) -> None:
            order_id = f"o-{worker}-{i}"
            async with bus.transaction() as tx:
                await tx.connection.execute(insert, order_id, i)
                await tx.publish(OrderPlaced(order_id, i), key=order_id)

        return await _timed_loop(connections, duration, one)
    finally:
        await bus.close()


async def _raw(dsn: str, schema: str, connections: int, duration: float, *, notify: bool = False) -> dict[str, Any]:
    s = quote_schema(schema)
    insert = f"INSERT INTO {s}.bench_orders (order_id, total_cents) VALUES ($1, $2)"
    outbox = (
        f"INSERT INTO {s}.bench_raw_outbox (id, topic, key, payload, headers) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)"
    )
    encode = msgspec.json.Encoder().encode
    channel = f"eventbus_{schema}"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=connections)
    try:

        async def one(worker: int, i: int) -> None:
            order_id = f"o-{worker}-{i}"
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(insert, order_id, i)
                payload = encode(OrderPlaced(order_id, i)).decode()
                await conn.execute(outbox, new_id(), "OrderPlaced", order_id, payload, "{}")
                if notify:
                    await conn.execute("SELECT pg_notify($1, '')", channel)

        return await _timed_loop(connections, duration, one)
    finally:
        await pool.close()


async def run(settings: Settings) -> Outcome:
    levels = [4] if settings.quick else [1, 4, 8]
    duration = 3.0 if settings.quick else 10.0
    outcome = Outcome(details={"duration_s": duration, "warmup_s": WARMUP})
    for connections in levels:
        async with scratch_schema(settings.dsn, NAME) as schema:
            conn = await asyncpg.connect(settings.dsn)
            try:
                await conn.execute(_ddl(schema))
            finally:
                await conn.close()
            # The three runs take turns in short rounds, in a rotating order, so that drift on a shared machine
            # (autovacuum, other load, table growth) falls on all of them alike.
            dsn, n = settings.dsn, connections
            runs = {
                "eventbus": lambda d, dsn=dsn, n=n, schema=schema: _ours(dsn, schema, n, d),
                "eventbus_no_notify": lambda d, dsn=dsn, n=n, schema=schema: _ours(dsn, schema, n, d, notify=False),
                "raw": lambda d, dsn=dsn, n=n, schema=schema: _raw(dsn, schema, n, d),
                "raw_notify": lambda d, dsn=dsn, n=n, schema=schema: _raw(dsn, schema, n, d, notify=True),
            }
            names = list(runs)
            totals = {name: {"transactions": 0, "seconds": 0.0, "errors": 0, "last_error": None} for name in names}
            print(f"  offer with {connections} connections: 4 variants taking turns in {ROUNDS} rounds ...",
                  flush=True)  # fmt: skip
            for round_ in range(ROUNDS):
                turn = round_ % len(names)
                for name in names[turn:] + names[:turn]:
                    result = await runs[name](duration / ROUNDS)
                    total = totals[name]
                    total["transactions"] += result["transactions"]
                    total["seconds"] += result["seconds"]
                    total["errors"] += result["errors"]
                    total["last_error"] = result["last_error"] or total["last_error"]
            for total in totals.values():
                total["tx_per_s"] = total["transactions"] / total["seconds"]
            ours, raw, raw_notify = totals["eventbus"], totals["raw"], totals["raw_notify"]
            quiet = totals["eventbus_no_notify"]
        outcome.details[f"{connections} connections"] = totals
        note = f"errors {ours['errors']}/{raw['errors']}" if ours["errors"] or raw["errors"] else ""
        outcome.rows.append(
            Row.compare(NAME, f"{connections} conns", "business row + event", ours["tx_per_s"], "tx/s",
                        raw["tx_per_s"], "raw asyncpg 2 inserts", note=note)
        )  # fmt: skip
        outcome.rows.append(
            Row.compare(NAME, f"{connections} conns", "business row + event, notify=False", quiet["tx_per_s"],
                        "tx/s", raw["tx_per_s"], "raw asyncpg 2 inserts", note="relays poll instead of waking")
        )  # fmt: skip
        outcome.rows.append(
            Row.compare(NAME, f"{connections} conns", "business row + event", ours["tx_per_s"], "tx/s",
                        raw_notify["tx_per_s"], "raw 2 inserts + pg_notify", note="like for like")
        )  # fmt: skip
        outcome.rows.append(
            Row.compare(NAME, f"{connections} conns", "raw + pg_notify", raw_notify["tx_per_s"], "tx/s",
                        raw["tx_per_s"], "raw asyncpg 2 inserts", note="diagnostic: what NOTIFY at commit costs")
        )  # fmt: skip
    return outcome
