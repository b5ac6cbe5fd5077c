"""The claim query's plan with a large backlog of relayed rows: it must walk the partial index of pending rows,
never the table (docs/architecture.md, "Tables": claims that scan past relayed history slow down without bound)."""

from __future__ import annotations

import json
import time
from typing import Any

import asyncpg
import pytest

from eventbus import OutboxRepository
from eventbus.sql import Queries, quote_schema

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROWS = 1_000_000
PENDING_EVERY = 100  # 1% pending, spread evenly through the id range

# A UUIDv7-shaped id per row: 48 bits of milliseconds (one per row, from 2023-11-14), version 7, variant 10.
BACKLOG = f"""
INSERT INTO __table__ (id, event_id, topic, payload, status, attempts, published_at, created_at, available_at)
SELECT u, u, 'orders.placed', '{{}}'::jsonb,
       CASE WHEN g % {PENDING_EVERY} = 0 THEN 0 ELSE 2 END,
       CASE WHEN g % {PENDING_EVERY} = 0 THEN 0 ELSE 1 END,
       CASE WHEN g % {PENDING_EVERY} = 0 THEN NULL ELSE now() END,
       now() - interval '1 hour', now() - interval '1 hour'
FROM generate_series(1, {ROWS}) AS g,
     LATERAL (SELECT (lpad(to_hex(1700000000000 + g), 12, '0') || '7000' || '8000'
                      || lpad(to_hex(g), 12, '0'))::uuid AS u) AS ids
"""


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def _explain(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...]) -> tuple[list[dict[str, Any]], str]:
    # EXPLAIN without ANALYZE plans the UPDATE but does not run it; bind parameters give it a custom plan.
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    text = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *args))
    return _nodes(plan), text


@pytest.mark.parametrize("partitions", [None, [0, 1, 2, 3, 4, 5, 6, 7]], ids=["every-partition", "some-partitions"])
async def test_claim_uses_pending_index_with_large_relayed_backlog(
    eventbus_dsn: str, eventbus_schema: str, partitions: list[int] | None
) -> None:
    table = f"{quote_schema(eventbus_schema)}.eventbus_outbox"
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        started = time.perf_counter()
        await conn.execute(BACKLOG.replace("__table__", table))
        await conn.execute(f"ANALYZE {table}")
        built = time.perf_counter() - started
        counts = await conn.fetchrow(
            f"SELECT count(*) AS total, count(*) FILTER (WHERE status = 0) AS pending FROM {table}"
        )
        assert (counts["total"], counts["pending"]) == (ROWS, ROWS // PENDING_EVERY)

        claim = Queries(eventbus_schema).claim
        # Rows targeted at a subscriber without room are skipped by the same scan.
        skip = ["a-full-subscriber"] if partitions else None
        # And so are rows targeted at subscribers registered elsewhere (the relay carries one subscriber).
        carried = (["a-subscriber"], ["a-topic"]) if partitions else (None, None)
        args = (100, "relay-1", 30.0, partitions, skip, skip, *carried)
        nodes, text = await _explain(conn, claim, args)
        print(f"\nbacklog of {ROWS} rows built and analysed in {built:.1f} s; claim plan ({partitions=}):\n{text}")

        scans = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes]
        assert not any(kind == "Seq Scan" and relation == "eventbus_outbox" for kind, relation, _ in scans), scans
        assert any(index == "eventbus_outbox_pending_tenants" for _, _, index in scans), scans
        picked = [n for n in nodes if n.get("Index Name") == "eventbus_outbox_pending_tenants"]
        assert all(n["Node Type"] in {"Index Scan", "Index Only Scan", "Bitmap Index Scan"} for n in picked)

        # And the claim really takes the oldest pending rows, none of the relayed history.
        oldest = [r["id"] for r in await conn.fetch(f"SELECT id FROM {table} WHERE status = 0 ORDER BY id LIMIT 100")]
        rows = await conn.fetch(claim, *args)
        assert sorted(r["id"] for r in rows) == oldest
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE status = 1") == 100
    finally:
        await conn.close()


async def test_an_outbox_that_outgrew_its_statistics_is_analyzed_once_per_doubling(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    table = f"{quote_schema(eventbus_schema)}.eventbus_outbox"
    pool = await asyncpg.create_pool(eventbus_dsn, min_size=1, max_size=2)
    try:
        outbox = OutboxRepository(pool, eventbus_schema)
        assert not await outbox.refresh_statistics(), "an empty table needs no statistics"

        async def grow(rows: int) -> None:
            await pool.execute(
                f"INSERT INTO {table} (id, event_id, topic, payload) "
                f"SELECT u, u, 't', '{{}}' FROM (SELECT gen_random_uuid() AS u FROM generate_series(1, {rows})) AS g"
            )

        async def relpages() -> int:
            return int(await pool.fetchval("SELECT relpages FROM pg_class WHERE oid = $1::regclass", table))

        await grow(20_000)  # several hundred pages, never analyzed
        assert await relpages() == 0
        assert await outbox.refresh_statistics()
        analyzed = await relpages()
        assert analyzed > 64
        assert not await outbox.refresh_statistics(), "statistics that describe the table are kept"
        await grow(10_000)
        assert not await outbox.refresh_statistics(), "less than twice the size: left to autovacuum"
        await grow(40_000)
        assert await outbox.refresh_statistics()
        assert await relpages() > 2 * analyzed
    finally:
        await pool.close()


async def test_the_gauge_query_reads_only_pending_rows_and_unreplayed_letters(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """The elected relay's one statement for the gauges must not scan the outbox's settled history."""
    table = f"{quote_schema(eventbus_schema)}.eventbus_outbox"
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        await conn.execute(BACKLOG.replace("__table__", table))
        await conn.execute(
            f"INSERT INTO {quote_schema(eventbus_schema)}.eventbus_subscriptions (name, topics) "
            "VALUES ('mailer', '{orders.placed}'), ('billing', '{orders.placed}')"
        )
        await conn.execute(f"ANALYZE {table}")
        gauges = Queries(eventbus_schema).metrics_gauges
        nodes, text = await _explain(conn, gauges, ())
        print(f"\ngauge plan on {ROWS} rows:\n{text}")
        scans = [(n["Node Type"], n.get("Relation Name"), n.get("Index Name")) for n in nodes]
        assert not any(kind == "Seq Scan" and relation == "eventbus_outbox" for kind, relation, _ in scans), scans
        started = time.perf_counter()
        row = await conn.fetchrow(gauges)
        took = time.perf_counter() - started
        print(f"gauges read in {took * 1000:.0f} ms: {dict(row)}")
        assert row["pending"] == ROWS // PENDING_EVERY and row["in_flight"] == 0
        assert row["lag"] > 3000  # the pending rows came due an hour ago
        assert row["subscribers"] == ["billing", "mailer"]
        assert row["subscriber_pending"] == [ROWS // PENDING_EVERY] * 2
    finally:
        await conn.close()
