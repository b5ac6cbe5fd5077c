"""Backlog burn-down: how fast the relay drains N pending events to a no-op subscriber.

Each variant gets its own freshly migrated schema, filled with N pending events through
``OutboxRepository.offer`` (chunks of 5000 per transaction), then ``VACUUM (ANALYZE)``, so every variant starts
from the same state. The clock starts when the relay starts (the pool is already open) and stops when the relay
has settled all N rows.

Baseline, same run: the raw SQL limit, on one dedicated connection, a loop of the ``claim`` query with the same
batch size followed by ``settle`` marking the claimed ids relayed; no Python work in between beyond
collecting the ids. A third variant, the repository loop (``claim`` + ``settle`` through the
pool), separates the cost of the repository's Python and pool round trips from that of the relay and actors.
The relay keeps up to ``max_batches_in_flight`` batches going at once, so it can beat a sequential loop.
A fourth variant, diagnostic, runs the raw loop with ``plan_cache_mode = force_custom_plan``: the gap between
it and the raw loop is what PostgreSQL's generic plans for the prepared claim/settle statements cost.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

import anyio
import asyncpg
import msgspec

from eventbus import EventBus, NewEvent, OutboxRepository, RelayConfig, Settlement, Status
from eventbus.sql import Queries

from ._common import Outcome, Row, Settings, scratch_schema, vacuum_analyze

NAME = "burndown"
CHUNK = 5000
LEASE = 60.0


class Item(msgspec.Struct, frozen=True):
    seq: int
    body: str


_encode = msgspec.json.Encoder().encode


async def fill(dsn: str, schema: str, count: int) -> float:
    """Insert ``count`` pending events through the repository's offer; return the seconds it took."""
    started = perf_counter()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        outbox = OutboxRepository(pool, schema)
        for first in range(0, count, CHUNK):
            events = [
                NewEvent(topic="Item", payload=_encode(Item(seq, f"payload {seq:08d} " + "x" * 64)))
                for seq in range(first, min(count, first + CHUNK))
            ]
            async with pool.acquire() as conn, conn.transaction():
                await outbox.offer(conn, events)
    finally:
        await pool.close()
    await vacuum_analyze(dsn, schema)
    return perf_counter() - started


async def relay_drain(dsn: str, schema: str, count: int, batch_size: int, **bus_options: Any) -> dict[str, Any]:
    """Drain ``count`` pending events in ``schema`` with an EventBus relay and one no-op subscriber (``bus_options``
    go to the EventBus)."""
    handled = 0
    all_handled = anyio.Event()
    bus = EventBus(
        dsn, schema=schema, migrate=False, relay_config=RelayConfig(batch_size=batch_size, lease=LEASE), **bus_options
    )

    @bus.subscribe(name="burndown_noop", timeout=30, max_attempts=3)
    async def noop(event: Item) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            all_handled.set()

    watcher = await asyncpg.connect(dsn)
    try:
        await bus.connect()
        started = perf_counter()
        # The waits are bounded inside `async with bus`, so the bus always stops normally (see the report on
        # EventBus.stop under an outer cancellation).
        async with bus:
            with anyio.move_on_after(time_limit(count)) as limit:
                await all_handled.wait()
                await wait_settled(watcher, schema)
            seconds = perf_counter() - started
            relay = bus.relay
            assert relay is not None
            stats = relay.statistics()
    finally:
        await watcher.close()
    if limit.cancelled_caught:
        raise TimeoutError(f"relay did not drain {count} events within {time_limit(count):g} s ({handled} handled)")
    return {"events": count, "handled": handled, "seconds": seconds, "events_per_s": count / seconds,
            "batches": stats.batches, "claimed": stats.claimed,
            "relay_statistics_settled": stats.settled}  # fmt: skip


#: The session settings of the relay's own connections (``eventbus._pool.create_pool(jit=False)``), for the
#: loops that run its statements by hand.
RELAY_SESSION = {"jit": "off"}


def time_limit(count: int) -> float:
    """Seconds a drain of ``count`` events may take before the variant is abandoned (a stuck relay)."""
    return max(30.0, count / 1000)


async def wait_settled(conn: asyncpg.Connection, schema: str) -> None:
    """Return once no outbox row is pending or claimed (asks the database: it alone knows)."""
    query = Queries(schema).outbox_unsettled
    while await conn.fetchval(query):  # noqa: ASYNC110
        await anyio.sleep(0.005)


async def _raw_sql(dsn: str, schema: str, count: int, batch_size: int, *, custom_plans: bool = False) -> dict[str, Any]:
    queries = Queries(schema)
    claim, settle = queries.claim, queries.settle
    worker = "bench-raw"
    conn = await asyncpg.connect(dsn, server_settings=RELAY_SESSION)
    try:
        if custom_plans:
            await conn.execute("SET plan_cache_mode = force_custom_plan")
        settled = batches = 0
        started = perf_counter()
        while True:
            rows = await conn.fetch(claim, batch_size, worker, LEASE, None, None, None, None, None)
            if not rows:
                break
            n = len(rows)
            done = await conn.fetchrow(
                settle, worker, [r["id"] for r in rows], [r["attempts"] for r in rows], [int(Status.RELAYED)] * n,
                [0.0] * n, [None] * n, [], [], [], [], [], [], [], [], [], [], [], [], [], [], LEASE, None, None, None,
                [], [],
            )  # fmt: skip
            assert done is not None
            settled += done["settled"]
            batches += 1
        seconds = perf_counter() - started
    finally:
        await conn.close()
    return _drained(count, settled, seconds, batches)


def _drained(count: int, settled: int, seconds: float, batches: int) -> dict[str, Any]:
    return {"events": count, "settled": settled, "seconds": seconds, "events_per_s": settled / seconds,
            "batches": batches}  # fmt: skip


async def _repository_loop(dsn: str, schema: str, count: int, batch_size: int) -> dict[str, Any]:
    worker = "bench-repo"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, server_settings=RELAY_SESSION)
    try:
        outbox = OutboxRepository(pool, schema)
        settled = batches = 0
        started = perf_counter()
        while True:
            rows = await outbox.claim(batch_size, LEASE, worker)
            if not rows:
                break
            settlement = Settlement()
            for row in rows:
                settlement.mark(row, Status.RELAYED)
            settled += await outbox.settle(worker, settlement)
            batches += 1
        seconds = perf_counter() - started
    finally:
        await pool.close()
    return _drained(count, settled, seconds, batches)


async def _raw_sql_custom_plans(dsn: str, schema: str, count: int, batch_size: int) -> dict[str, Any]:
    return await _raw_sql(dsn, schema, count, batch_size, custom_plans=True)


#: raw_sql_custom_plans is a diagnostic: the same loop with plan_cache_mode = force_custom_plan, which shows
#: what the prepared statements' generic plans cost (asyncpg prepares every statement; PostgreSQL switches a
#: prepared statement to its generic plan after five executions when that looks no more expensive).
VARIANTS = {
    "relay": relay_drain,
    "raw_sql": _raw_sql,
    "repository_loop": _repository_loop,
    "raw_sql_custom_plans": _raw_sql_custom_plans,
}


async def run(settings: Settings) -> Outcome:
    count = 20_000 if settings.quick else 200_000
    batch_sizes = [500, 1000]
    outcome = Outcome(details={"events": count, "chunk": CHUNK})
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for batch_size in batch_sizes:
        results[batch_size] = {}
        for variant, fn in VARIANTS.items():
            async with scratch_schema(settings.dsn, NAME) as schema:
                fill_s = await fill(settings.dsn, schema, count)
                print(f"  burndown {count} events, batch {batch_size}: {variant} (filled in {fill_s:.1f} s) ...",
                      flush=True)  # fmt: skip
                result = await fn(settings.dsn, schema, count, batch_size)
                result["fill_seconds"] = fill_s
                result["fill_events_per_s"] = count / fill_s
                results[batch_size][variant] = result
    outcome.details["results"] = {str(k): v for k, v in results.items()}
    for batch_size in batch_sizes:
        raw = results[batch_size]["raw_sql"]["events_per_s"]
        label = f"raw claim+settle b={batch_size}"
        ours = results[batch_size]["relay"]
        outcome.rows.append(
            Row.compare(NAME, f"batch {batch_size}", "relay drain", ours["events_per_s"], "ev/s", raw, label,
                        note=f"{ours['batches']} batches")
        )  # fmt: skip
        outcome.rows.append(
            Row.compare(NAME, f"batch {batch_size}", "repository loop", results[batch_size]["repository_loop"]
                        ["events_per_s"], "ev/s", raw, label)
        )  # fmt: skip
        outcome.rows.append(
            Row.compare(NAME, f"batch {batch_size}", "raw, force_custom_plan", results[batch_size]
                        ["raw_sql_custom_plans"]["events_per_s"], "ev/s", raw, label,
                        note="diagnostic: generic-plan cost")
        )  # fmt: skip
    best = max(batch_sizes, key=lambda b: results[b]["relay"]["events_per_s"])
    best_raw = max(batch_sizes, key=lambda b: results[b]["raw_sql"]["events_per_s"])
    outcome.rows.append(
        Row.compare(NAME, f"best (relay b={best}, raw b={best_raw})", "relay drain",
                    results[best]["relay"]["events_per_s"], "ev/s", results[best_raw]["raw_sql"]["events_per_s"],
                    f"best raw b={best_raw}")
    )  # fmt: skip
    outcome.details["best_batch_size"] = best
    return outcome
