"""Producer throughput: transactions/s of "insert one business row + publish one event".

Ours: ``async with bus.transaction() as tx`` + an INSERT into a business table + ``tx.publish``. Baseline, same
run, same number of connections: raw asyncpg doing the same two inserts by hand, the event going into a plain
outbox-shaped table (UUIDv7 primary key, topic, key, jsonb payload and headers, created_at) with no other
index and no NOTIFY. A diagnostic third run adds ``pg_notify`` to the raw transaction, separating what the
commit-time NOTIFY costs (PostgreSQL serialises committing transactions that notify) from the rest. Every
worker loops for a fixed time; transactions finished in the window after a short warm-up are counted. The
runs take turns in short rounds in a rotating order on one schema; background load is not controlled. The
printed ratio is the median of the rounds' ratios (the totals are printed beside it and kept in the JSON).
"""

from __future__ import annotations

import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
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
WARMUP = 0.5  # per variant, once, before the rounds


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


One = Callable[[int, int], Awaitable[None]]


async def _timed_loop(workers: int, duration: float, one: One) -> dict[str, Any]:
    """Run ``one(worker, i)`` in ``workers`` tasks for ``duration`` s; count what finished in that time."""
    end = perf_counter() + duration
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
                if perf_counter() < end:
                    counted += 1
            i += 1

    async with anyio.create_task_group() as tg:
        for w in range(workers):
            tg.start_soon(loop, w)
    return {"transactions": counted, "seconds": duration, "tx_per_s": counted / duration, "errors": errors,
            "last_error": last_error}  # fmt: skip


@asynccontextmanager
async def _ours(dsn: str, schema: str, connections: int, *, notify: bool = True, **options: Any) -> AsyncIterator[One]:
    bus = EventBus(dsn, schema=schema, relay=False, migrate=False, pool_size=connections, notify=notify, **options)
    insert = f"INSERT INTO {quote_schema(schema)}.bench_orders (order_id, total_cents) VALUES ($1, $2)"
    await bus.start()
    try:

        async def one(worker: int, i: int) -> None:
            order_id = f"o-{worker}-{i}"
            async with bus.transaction() as tx:
                await tx.connection.execute(insert, order_id, i)
                await tx.publish(OrderPlaced(order_id, i), key=order_id)

        yield one
    finally:
        await bus.stop()


@asynccontextmanager
async def _raw(dsn: str, schema: str, connections: int, *, notify: bool = False) -> AsyncIterator[One]:
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

        yield one
    finally:
        await pool.close()


def _paired(case: str, metric: str, ours: dict[str, Any], base: dict[str, Any], label: str, note: str = "") -> Row:
    """A row whose ratio is the median of the rounds' ratios: each round ran every variant back to back, so
    drift, and a noisy round on a shared machine, fall out of it."""
    ratios = [x / y for x, y in zip(ours["tx_per_s_by_round"], base["tx_per_s_by_round"], strict=True) if y]
    row = Row.compare(NAME, case, metric, ours["tx_per_s"], "tx/s", base["tx_per_s"], label, note=note)
    row.ratio = statistics.median(ratios) if ratios else None
    return row


async def run(settings: Settings) -> Outcome:
    levels = [4] if settings.quick else [1, 4, 8]
    duration = 3.0 if settings.quick else 10.0
    rounds = 12 if settings.quick else 20
    outcome = Outcome(details={"duration_s": duration, "warmup_s": WARMUP, "rounds": rounds})
    for connections in levels:
        async with scratch_schema(settings.dsn, NAME) as schema:
            conn = await asyncpg.connect(settings.dsn)
            try:
                await conn.execute(_ddl(schema))
            finally:
                await conn.close()
            # The variants take turns in short rounds, in a rotating order, so that drift on a shared machine
            # (autovacuum, checkpoints, other load, table growth) falls on all of them alike. Each keeps its pool
            # open across rounds.
            names = ["eventbus", "eventbus_no_notify", "raw", "raw_notify"]
            totals: dict[str, dict[str, Any]] = {
                name: {"transactions": 0, "seconds": 0.0, "errors": 0, "last_error": None, "tx_per_s_by_round": []}
                for name in names
            }  # fmt: skip
            print(f"  offer with {connections} connections: 4 variants taking turns in {rounds} rounds ...",
                  flush=True)  # fmt: skip
            async with AsyncExitStack() as stack:
                dsn, n = settings.dsn, connections
                ones = {
                    "eventbus": await stack.enter_async_context(_ours(dsn, schema, n)),
                    "eventbus_no_notify": await stack.enter_async_context(_ours(dsn, schema, n, notify=False)),
                    "raw": await stack.enter_async_context(_raw(dsn, schema, n)),
                    "raw_notify": await stack.enter_async_context(_raw(dsn, schema, n, notify=True)),
                }
                for name in names:  # first connections, prepared statements, plans
                    await _timed_loop(connections, WARMUP, ones[name])
                for round_ in range(rounds):
                    turn = round_ % len(names)
                    for name in names[turn:] + names[:turn]:
                        result = await _timed_loop(connections, duration / rounds, ones[name])
                        total = totals[name]
                        total["tx_per_s_by_round"].append(result["tx_per_s"])
                        total["transactions"] += result["transactions"]
                        total["seconds"] += result["seconds"]
                        total["errors"] += result["errors"]
                        total["last_error"] = result["last_error"] or total["last_error"]
            for total in totals.values():
                total["tx_per_s"] = total["transactions"] / total["seconds"]
        outcome.details[f"{connections} connections"] = totals
        ours, raw = totals["eventbus"], totals["raw"]
        note = f"errors {ours['errors']}/{raw['errors']}" if ours["errors"] or raw["errors"] else ""

        case = f"{connections} conns"
        outcome.rows += [
            _paired(case, "business row + event", ours, raw, "raw asyncpg 2 inserts", note),
            _paired(case, "business row + event, notify=False", totals["eventbus_no_notify"], raw,
                    "raw asyncpg 2 inserts", "relays poll instead of waking"),
            _paired(case, "business row + event", ours, totals["raw_notify"], "raw 2 inserts + pg_notify",
                    "like for like"),
            _paired(case, "raw + pg_notify", totals["raw_notify"], raw, "raw asyncpg 2 inserts",
                    "diagnostic: what NOTIFY at commit costs"),
        ]  # fmt: skip
    return outcome
