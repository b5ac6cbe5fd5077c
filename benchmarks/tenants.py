"""What row-level security costs a role that is not a superuser (superusers bypass it, so the other benchmarks,
which connect as one, do not see it).

Roles made for the run, not superusers: a relay role and a producer role that see every tenant (listed nowhere),
and a producer role confined to tenant ``acme``. Offer: ``bus.transaction`` with a business row and an event,
four connections, for each producer role with the policies in force, and beside it, as the baseline, the
unconfined producer with row-level security disabled on the tables (``ALTER TABLE ... DISABLE ROW LEVEL
SECURITY``); the variants take turns in rounds. Burn-down: the relay role drains 20,000 events (quick) with the
policies in force, then with them disabled. One schema per variant family; the roles are dropped afterwards.

Fair claims: tenant ``a`` has a backlog of pending events (200,000 quick, 1,000,000 full, copied in before the
relay starts) and tenant ``b`` publishes 100 events/s from the steady producer's child process; one subscriber
(a no-op) handles both tenants' events, as one service does for all its tenants; the relay is a superuser here.
Measured: ``b``'s commit-to-handler latency beside the backlog, against the same without it, and how much of
``a``'s backlog was still left when ``b``'s last event was handled.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec

from eventbus import EventBus, RelayConfig
from eventbus.ids import new_id
from eventbus.roles import apply_roles
from eventbus.sql import quote_schema

from ._common import Outcome, Row, Settings, scratch_schema
from ._producer import Tick
from ._steady import Arrivals, latency_report, run_producer
from .burndown import Item, fill, relay_drain
from .offer import _ddl, _ours, _timed_loop

NAME = "tenants"
FAIR_RATE = 100.0  # tenant b's events per second
CONNECTIONS = 4
TABLES = ("eventbus_outbox", "eventbus_dead_letters")


def _as(dsn: str, role: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}"))


@asynccontextmanager
async def _logins(dsn: str, schema: str) -> AsyncIterator[dict[str, str]]:
    """Login roles for the run: ``relay``, ``producer`` (every tenant) and ``acme`` (confined)."""
    conn = await asyncpg.connect(dsn)
    prefix = f"bench_{uuid.uuid4().hex[:6]}"
    made: list[str] = []
    try:
        groups = {(g.kind, g.tenant): g.name for g in await apply_roles(conn, schema, ["acme"])}
        wanted = {"relay": ("relay", None), "producer": ("relay", None), "acme": ("producer", "acme")}
        logins = {}
        for login, group in wanted.items():
            name = f"{prefix}_{login}"
            await conn.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE "{groups[group]}"')
            made.append(name)
            logins[login] = name
        await conn.execute(f"GRANT SELECT, INSERT ON {quote_schema(schema)}.bench_orders TO PUBLIC")
        await conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {quote_schema(schema)} TO PUBLIC")
        made += list(groups.values())
        yield logins
    finally:
        for name in made:
            await conn.execute(f'DROP OWNED BY "{name}"')
            await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        await conn.close()


@asynccontextmanager
async def _schema_with_logins(dsn: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A scratch schema with the offer benchmark's tables, and the run's login roles on it."""
    async with scratch_schema(dsn, NAME) as schema:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(_ddl(schema))
        finally:
            await conn.close()
        async with _logins(dsn, schema) as logins:
            yield schema, logins


async def _security(dsn: str, schema: str, on: bool) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for table in TABLES:
            await conn.execute(f"ALTER TABLE {quote_schema(schema)}.{table} "
                               f"{'ENABLE' if on else 'DISABLE'} ROW LEVEL SECURITY")  # fmt: skip
    finally:
        await conn.close()


async def _offer(dsn: str, schema: str, duration: float, **options: Any) -> float:
    async with _ours(dsn, schema, CONNECTIONS, **options) as one:
        result = await _timed_loop(CONNECTIONS, duration, one)
    if result["errors"]:
        raise RuntimeError(f"offer failed: {result['last_error']}")
    return float(result["tx_per_s"])


async def _backlog(dsn: str, schema: str, count: int, tenant: str) -> None:
    """``count`` pending events of ``tenant`` (older than anything published afterwards), copied in."""
    payload = msgspec.json.encode(Item(0, "backlog " + "x" * 64)).decode()
    conn = await asyncpg.connect(dsn)
    try:
        for first in range(0, count, 50_000):
            rows = []
            for _ in range(min(50_000, count - first)):
                row_id = new_id()
                rows.append((row_id, row_id, tenant, "Item", payload))
            await conn.copy_records_to_table("eventbus_outbox", schema_name=schema, records=rows,
                                             columns=["id", "event_id", "tenant", "topic", "payload"])  # fmt: skip
        await conn.execute(f"ANALYZE {quote_schema(schema)}.eventbus_outbox")
    finally:
        await conn.close()


async def _fairness(dsn: str, backlog: int, rate: float, duration: float) -> dict[str, Any]:
    """Tenant b's commit-to-handler latency at ``rate`` while the relay works through tenant a's ``backlog``."""
    async with scratch_schema(dsn, NAME) as schema:
        if backlog:
            await _backlog(dsn, schema, backlog, "a")
        started = Arrivals()
        drained = 0
        bus = EventBus(dsn, schema=schema, migrate=False,
                       relay_config=RelayConfig(use_notify=True, poll_interval=1.0))  # fmt: skip

        @bus.subscribe(name="fair", timeout=5, max_attempts=3, concurrency=8)
        async def handler(event: Tick | Item) -> None:  # one service's handler, for both tenants
            nonlocal drained
            if isinstance(event, Tick):
                started.record(event.seq)
            else:
                drained += 1

        async with bus:
            run = await run_producer("eventbus", dsn, rate, duration, schema=schema, notify="1", tenant="b")
            await started.wait_for(len(run.committed), 10.0)
            left = backlog - drained
        report = latency_report(run, started.times, {"backlog": backlog})
        report["backlog_left"] = left
        return report


async def run(settings: Settings) -> Outcome:
    rounds, duration = (3, 2.0) if settings.quick else (5, 5.0)
    count = 20_000 if settings.quick else 100_000
    outcome = Outcome(details={"rounds": rounds, "seconds_per_round": duration, "events": count})
    by: dict[str, list[float]] = {"unconfined": [], "confined": [], "disabled": []}
    async with _schema_with_logins(settings.dsn) as (schema, logins):
        for r in range(rounds):
            print(f"  tenants: offer round {r + 1} of {rounds} ...", flush=True)
            await _security(settings.dsn, schema, True)
            by["unconfined"].append(await _offer(_as(settings.dsn, logins["producer"]), schema, duration))
            by["confined"].append(await _offer(_as(settings.dsn, logins["acme"]), schema, duration, tenant="acme"))
            await _security(settings.dsn, schema, False)
            by["disabled"].append(await _offer(_as(settings.dsn, logins["producer"]), schema, duration))
    drains: dict[str, float] = {}
    for policies in (True, False):
        async with _schema_with_logins(settings.dsn) as (schema, logins):
            await fill(settings.dsn, schema, count)
            await _security(settings.dsn, schema, policies)
            print(f"  tenants: burn-down of {count}, policies {'on' if policies else 'off'} ...", flush=True)
            drained = await relay_drain(_as(settings.dsn, logins["relay"]), schema, count, 500)
            drains["on" if policies else "off"] = drained["events_per_s"]
    backlog = 200_000 if settings.quick else 1_000_000
    fair_seconds = 5.0 if settings.quick else 15.0
    fairness: dict[str, dict[str, Any]] = {}
    for size in (0, backlog):
        print(f"  tenants: tenant b at {FAIR_RATE:g}/s beside tenant a's backlog of {size:,} ...", flush=True)
        fairness[str(size)] = await _fairness(settings.dsn, size, FAIR_RATE, fair_seconds)
    outcome.details.update(offer=by, burndown=drains, fairness=fairness)
    baseline = statistics.median(by["disabled"])
    for variant, label in (("unconfined", "unconfined role, policies on"), ("confined", "role confined to acme")):
        ratios = [x / y for x, y in zip(by[variant], by["disabled"], strict=True)]
        outcome.rows.append(Row.compare(
            NAME, f"offer, {CONNECTIONS} connections", label, statistics.median(by[variant]), "tx/s", baseline,
            "unconfined role, row-level security disabled",
            note=f"median of {rounds} rounds' ratios {statistics.median(ratios):.2f}",
        ))  # fmt: skip
    outcome.rows.append(Row.compare(
        NAME, f"burn-down of {count}", "relay role, policies on", drains["on"], "ev/s", drains["off"],
        "relay role, row-level security disabled",
    ))  # fmt: skip
    alone, beside = fairness["0"]["latency_ms"], fairness[str(backlog)]["latency_ms"]
    left = fairness[str(backlog)]["backlog_left"]
    for metric in ("p50", "p99"):
        outcome.rows.append(Row.compare(
            NAME, f"tenant b @{FAIR_RATE:g}/s", f"commit->handler {metric}, a's backlog of {backlog:,}", beside[metric],
            "ms", alone[metric], "no backlog", note=f"a's backlog left at the end: {left:,}" if metric == "p99" else "",
        ))  # fmt: skip
    return outcome
