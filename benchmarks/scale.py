"""The outbox at scale, in both layouts: the plain one and the partitioned one (``eventbus migrate
--partitioning daily``).

Claims behind settled history: for N = 0, 1,000,000 and 10,000,000 rows (quick: 0, 20,000, 200,000), a fresh
schema gets N pending rows, which are then settled as relayed in one statement (the plain layout updates them
in place; the partitioned one moves them to its settled partitions), so the claim's index holds N dead entries.
Autovacuum is off for the table claims read (the outbox, or its live partition) and nobody runs VACUUM. With
20,000 fresh pending rows behind them, a claimer claims 100 rows and settles them as relayed, 150 times: p50/p99
against N = 0. Then what takes the dead entries out of the claims' path: a VACUUM of that table, timed, and the
claims again.

Retention of the N rows of the largest case (autovacuum on again), beside claims on the 20,000 pending rows
(claimed, then handed back, so the set stays the same): the plain layout deletes in batches with the retention
defaults (``RelayConfig.retention_batch`` rows, ``retention_pause`` between batches); the partitioned one drops
the partition holding them. Figures: time, WAL written (``pg_current_wal_lsn`` before and after, less what the
claimer writes per claim, measured alone for 2 s before; the server is otherwise idle), claim p99 while it runs,
and the outbox's size (tables and indexes, every partition) before and after.

Conversion: a plain outbox of N relayed rows (inserted by SQL) and 20,000 pending ones is converted to the
partitioned layout; the time is how long the outbox is locked.
"""

from __future__ import annotations

import os
from datetime import timedelta
from time import perf_counter
from typing import Any

import anyio
import asyncpg

from eventbus import NewEvent, OutboxRepository, RelayConfig, Status
from eventbus._pool import create_pool
from eventbus.migrations import migrate
from eventbus.sql import quote_schema

from ._common import Outcome, Row, Settings, percentile, scratch_schema
from .purge import claim_once

NAME = "scale"
PENDING = 20_000
CLAIM = 100
CLAIMS = 150
LAYOUTS = ("plain", "partitioned")
#: ``EVENTBUS_BENCH_SCALE_LAYOUTS=partitioned`` reruns one layout (and the conversion) alone.
_ONLY = os.environ.get("EVENTBUS_BENCH_SCALE_LAYOUTS")


async def _claims(repo: OutboxRepository, count: int) -> list[float]:
    """Claim ``CLAIM`` rows and settle them as relayed, ``count`` times; the claims' seconds, sorted."""
    return sorted([await claim_once(repo, Status.RELAYED, CLAIM) for _ in range(count)])


async def _offer_pending(repo: OutboxRepository, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for _ in range(0, PENDING, 5000):
            await repo.offer(conn, [NewEvent(topic="Flow", payload=b'{"n": 1}') for _ in range(5000)])


async def _claim_back_loop(repo: OutboxRepository, until: anyio.Event, into: list[float]) -> None:
    while not until.is_set():
        into.append(await claim_once(repo))


async def _size(conn: asyncpg.Connection, schema: str) -> int:
    return int(await conn.fetchval(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class AS c "
        "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r' "
        "AND c.relname LIKE 'eventbus_outbox%'", schema,
    ))  # fmt: skip


def _rows_sql(schema: str, rows: int, status: int = 0) -> str:
    """``rows`` rows of ``status`` with UUIDv7 ids from the last hours (one per 0.1 ms), older than any offered
    later."""
    return f"""
        INSERT INTO {quote_schema(schema)}.eventbus_outbox (id, event_id, topic, payload, status)
        SELECT u, u, 'Flow', '{{"n": 1}}'::jsonb, {status}
        FROM (SELECT (lpad(to_hex((extract(epoch FROM now() - interval '6 hours') * 1000)::bigint + i / 10), 12, '0')
                      || '7' || substr(md5(i::text), 1, 3) || '8' || substr(md5(i::text), 4, 15))::uuid AS u
              FROM generate_series(1, {rows}) AS i) AS ids
    """


async def _case(
    settings: Settings, layout: str, settled: int, baseline: dict[str, float], rows: list[Row], retention: bool
) -> dict[str, Any]:
    """One layout with ``settled`` rows settled behind the pending ones; with ``retention``, then their purge."""
    details: dict[str, Any] = {}
    config = RelayConfig()
    async with scratch_schema(settings.dsn, f"{NAME}_{layout[:4]}") as schema:
        conn = await asyncpg.connect(settings.dsn)
        if layout == "partitioned":
            await migrate(conn, schema, partitioning="daily")
        # The relay's pool: JIT off, and over the partitioned layout, statements planned for their parameters.
        pool = await create_pool(settings.dsn, max_size=4, jit=False, custom_plans=layout == "partitioned")
        table = "eventbus_outbox_live" if layout == "partitioned" else "eventbus_outbox"
        qualified = f"{quote_schema(schema)}.{table}"
        try:
            await conn.execute(f"ALTER TABLE {qualified} SET (autovacuum_enabled = off)")
            repo = OutboxRepository(pool, schema, notify=False)
            if settled:
                print(f"  scale: {layout}: {settled:,} rows pending, then settled ...", flush=True)
                began = perf_counter()
                await conn.execute(_rows_sql(schema, settled))
                await conn.execute(f"UPDATE {quote_schema(schema)}.eventbus_outbox SET status = 2, "
                                   "published_at = now() WHERE status = 0")  # fmt: skip
                details[f"{layout}_{settled}_fill_seconds"] = perf_counter() - began
            await _offer_pending(repo, pool)
            await conn.execute(f"ANALYZE {quote_schema(schema)}.eventbus_outbox")
            if layout == "partitioned":
                await conn.execute(f"ANALYZE {qualified}")
            case = f"{layout}, {settled:,} settled"
            timings = await _claims(repo, CLAIMS)
            for q in (50, 99):
                value = percentile(timings, q)
                assert value is not None
                baseline.setdefault(f"{layout}{q}", value)
                rows.append(Row.compare(NAME, case, f"claim p{q}, no VACUUM", value * 1000, "ms",
                                        baseline[f"{layout}{q}"] * 1000, "0 settled",
                                        note=f"{CLAIMS} claims of {CLAIM}, {settled:,} dead entries"))  # fmt: skip
            if not settled:
                return details
            began = perf_counter()
            await conn.execute(f"VACUUM {qualified}")
            rows.append(Row.compare(NAME, case, f"VACUUM {table}", perf_counter() - began, "s", None, "",
                                    note="takes the dead entries out of the claims' path"))  # fmt: skip
            await _offer_pending(repo, pool)  # the claims above took 15,000 of them
            timings = await _claims(repo, CLAIMS)
            for q in (50, 99):
                value = percentile(timings, q)
                assert value is not None
                rows.append(Row.compare(NAME, case, f"claim p{q} after that VACUUM", value * 1000, "ms",
                                        baseline[f"{layout}{q}"] * 1000, "0 settled"))  # fmt: skip
            if not retention:
                return details
            await _offer_pending(repo, pool)
            # Retention runs with autovacuum as the layout sets it, as in production.
            await conn.execute(f"ALTER TABLE {qualified} RESET (autovacuum_enabled)")
            before = await _size(conn, schema)
            print(f"  scale: {layout}: retention of {settled:,} rows ...", flush=True)
            # What the claimer alone writes per claim, to take out of the WAL measured during the purge.
            idle: list[float] = []
            wal = await conn.fetchval("SELECT pg_current_wal_lsn()")
            with anyio.move_on_after(2):
                await _claim_back_loop(repo, anyio.Event(), idle)
            per_claim = float(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", wal)) / len(idle)
            claims: list[float] = []
            finished = anyio.Event()
            wal = await conn.fetchval("SELECT pg_current_wal_lsn()")
            took: dict[str, float] = {}

            async def purge() -> None:
                began = perf_counter()
                # The settled rows are from the last hours: a window reaching two days ahead takes them all
                # (and, partitioned, the partitions made ahead, empty).
                took["rows"] = await repo.purge(
                    timedelta(days=-2), batch=config.retention_batch, pause=config.retention_pause
                )
                took["seconds"] = perf_counter() - began
                finished.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(_claim_back_loop, repo, finished, claims)
                await anyio.sleep(0.5)
                tg.start_soon(purge)
            written = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", wal)
            claims.sort()
            how = "DROP of its partition" if layout == "partitioned" else (
                f"DELETE in batches of {config.retention_batch}, {config.retention_pause * 1000:g} ms pauses")
            case = f"{layout}, retention of {settled:,} rows"
            rows.append(Row.compare(NAME, case, "time", took["seconds"], "s", None, "", note=how))
            rows.append(Row.compare(NAME, case, "WAL written", (float(written) - per_claim * len(claims)) / 1e6, "MB",
                                    None, "", note=f"the claims' own {per_claim * len(claims) / 1e6:.1f} MB taken out"))
            p99 = percentile(claims, 99)
            rows.append(Row.compare(NAME, case, "claim p99 while it runs", None if p99 is None else p99 * 1000, "ms",
                                    None, "", note=f"{len(claims)} claims"))  # fmt: skip
            rows.append(Row.compare(NAME, case, "outbox size after", await _size(conn, schema) / 1e6, "MB",
                                    before / 1e6, "size before"))  # fmt: skip
        finally:
            await pool.close()
            await conn.close()
    return details


async def _conversion(settings: Settings, total: int) -> list[Row]:
    """How long converting a plain outbox of ``total`` relayed rows and 20,000 pending ones holds it locked."""
    async with scratch_schema(settings.dsn, f"{NAME}_conv") as schema:
        conn = await asyncpg.connect(settings.dsn)
        try:
            print(f"  scale: converting an outbox of {total:,} rows ...", flush=True)
            await conn.execute(_rows_sql(schema, total, status=2))
            repo = OutboxRepository(await create_pool(settings.dsn, max_size=1), schema, notify=False)
            try:
                async with repo.pool.acquire() as c, c.transaction():
                    for _ in range(0, PENDING, 5000):
                        await repo.offer(c, [NewEvent(topic="Flow", payload=b'{"n": 1}') for _ in range(5000)])
            finally:
                await repo.pool.close()
            await conn.execute(f"VACUUM ANALYZE {quote_schema(schema)}.eventbus_outbox")
            began = perf_counter()
            await migrate(conn, schema, partitioning="daily")
            took = perf_counter() - began
        finally:
            await conn.close()
    return [Row.compare(NAME, f"conversion of {total:,} relayed + {PENDING:,} pending rows", "outbox locked", took,
                        "s", None, "", note="ACCESS EXCLUSIVE on the outbox: the whole conversion transaction")]


async def run(settings: Settings) -> Outcome:
    sizes = (0, 20_000, 200_000) if settings.quick else (0, 1_000_000, 10_000_000)
    outcome = Outcome(details={"settled": list(sizes), "pending": PENDING, "claim_batch": CLAIM, "claims": CLAIMS})
    conn = await asyncpg.connect(settings.dsn)
    try:
        for setting in ("autovacuum_naptime", "autovacuum_vacuum_scale_factor", "shared_buffers"):
            outcome.details[setting] = await conn.fetchval(f"SHOW {setting}")
    finally:
        await conn.close()
    baseline: dict[str, float] = {}
    for layout in _ONLY.split(",") if _ONLY else LAYOUTS:
        for settled in sizes:
            outcome.details.update(
                await _case(settings, layout, settled, baseline, outcome.rows, retention=settled == sizes[-1])
            )
    outcome.rows.extend(await _conversion(settings, sizes[-1]))
    return outcome
