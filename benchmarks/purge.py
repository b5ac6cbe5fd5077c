"""Claim latency while retention purges a large backlog of relayed rows.

The outbox holds N relayed rows from a day ago (quick 200,000; full 1,000,000) and 20,000 pending rows. A
claimer loops: claim 100 rows (timed), hand them back to pending (untimed), so the pending set stays the same.
It runs first alone (idle), then while ``OutboxRepository.purge`` deletes the relayed backlog with the
retention defaults (batches of ``RelayConfig.retention_batch`` rows, ``retention_pause`` between them). Figures:
claim p50/p99 under purge beside idle, and how long the purge took.
"""

from __future__ import annotations

from datetime import timedelta
from time import perf_counter
from typing import Any

import anyio
import asyncpg

from eventbus import NewEvent, OutboxRepository, RelayConfig, Settlement, Status
from eventbus.sql import quote_schema

from ._common import Outcome, Row, Settings, percentile, scratch_schema

NAME = "purge"
PENDING = 20_000
CLAIM = 100


def _backlog_sql(schema: str, rows: int) -> str:
    """Relayed rows with UUIDv7 ids from a day ago (one id per millisecond-ish, random tail)."""
    return f"""
        INSERT INTO {quote_schema(schema)}.eventbus_outbox
            (id, event_id, topic, payload, status, attempts, published_at, created_at)
        SELECT u, u, 'Backlog', '{{"n": 1}}'::jsonb, 2, 1, now() - interval '1 day', now() - interval '1 day'
        FROM (
            SELECT (lpad(to_hex((extract(epoch FROM now() - interval '1 day') * 1000)::bigint + i / 10), 12, '0')
                    || '7' || substr(md5(i::text), 1, 3) || '8' || substr(md5(i::text), 4, 15))::uuid AS u
            FROM generate_series(1, {rows}) AS i
        ) AS ids
    """


async def claim_once(repo: OutboxRepository, settle_as: Status = Status.PENDING, batch: int = CLAIM) -> float:
    """Claim ``batch`` rows as worker ``bench`` and settle them as ``settle_as`` (pending: handed back, so the set
    stays the same); return the claim's seconds."""
    started = perf_counter()
    rows = await repo.claim(batch, 30.0, "bench")
    took = perf_counter() - started
    out = Settlement()
    for row in rows:
        out.mark(row, settle_as)
    await repo.settle("bench", out)
    return took


async def _claim_loop(repo: OutboxRepository, until: float) -> list[float]:
    timings: list[float] = []
    while perf_counter() < until:
        timings.append(await claim_once(repo))
    return sorted(timings)


async def run(settings: Settings) -> Outcome:
    backlog = 200_000 if settings.quick else 1_000_000
    idle_seconds = 3.0 if settings.quick else 5.0
    config = RelayConfig()
    outcome = Outcome(details={"backlog": backlog, "pending": PENDING, "claim_batch": CLAIM})
    async with scratch_schema(settings.dsn, NAME) as schema:
        pool = await asyncpg.create_pool(settings.dsn, min_size=2, max_size=4)
        try:
            repo = OutboxRepository(pool, schema, notify=False)
            print(f"  purge: {backlog:,} relayed rows + {PENDING:,} pending ...", flush=True)
            async with pool.acquire() as conn:
                await conn.execute(_backlog_sql(schema, backlog))
                async with conn.transaction():
                    for _ in range(0, PENDING, 5000):
                        await repo.offer(conn, [NewEvent(topic="Live", payload=b'{"n": 2}') for _n in range(5000)])
                await conn.execute(f"VACUUM ANALYZE {quote_schema(schema)}.eventbus_outbox")
            print("  purge: claim latency idle ...", flush=True)
            idle = await _claim_loop(repo, perf_counter() + idle_seconds)
            print("  purge: claim latency while purging ...", flush=True)
            busy: list[float] = []
            purge_took: dict[str, Any] = {}

            async def purge() -> None:
                started = perf_counter()
                purge_took["deleted"] = await repo.purge(
                    timedelta(hours=1), batch=config.retention_batch, pause=config.retention_pause
                )
                purge_took["seconds"] = perf_counter() - started

            async with anyio.create_task_group() as tg:
                tg.start_soon(purge)
                await anyio.sleep(0.2)
                while "seconds" not in purge_took:
                    busy.extend(await _claim_loop(repo, perf_counter() + 0.5))
            busy.sort()
        finally:
            await pool.close()
    deleted = purge_took.get("deleted", 0)
    seconds = purge_took.get("seconds", 0.0)
    outcome.details.update(
        idle_claims=len(idle), busy_claims=len(busy), deleted=deleted, purge_seconds=seconds,
        batch=config.retention_batch, pause=config.retention_pause,
    )  # fmt: skip
    case = f"{backlog:,} relayed rows"
    for q in (50, 99):
        value, base = percentile(busy, q), percentile(idle, q)
        outcome.rows.append(
            Row.compare(NAME, case, f"claim p{q} while purging", None if value is None else value * 1000, "ms",
                        None if base is None else base * 1000, "claim idle", note=f"{len(busy)} claims")
        )  # fmt: skip
    outcome.rows.append(
        Row.compare(NAME, case, "purge rate", deleted / seconds if seconds else None, "rows/s", None, "",
                    note=f"deleted {deleted:,} in {seconds:.1f} s, batches of {config.retention_batch} with "
                    f"{config.retention_pause * 1000:g} ms pauses")
    )  # fmt: skip
    return outcome
