"""Fan-out: four subscribers per event, 1% of attempts failing, and the database statements each event costs.

N pending events are filled as in ``burndown``; four subscribers take every event, and each attempt raises
with probability 1% (a seeded RNG), retrying after a tiny backoff (5 ms, doubling) through a targeted retry row.
The clock runs from relay start until every subscriber has succeeded on every event and no row is left pending
or claimed. ``poll_interval`` is 50 ms here: retry rows are delayed, so no commit notification wakes the
relay for them, and the default 1 s poll would dominate the tail.

Statements are counted exactly, client side: every connection of the bus's pools (the application pool and the
relay's own) gets an asyncpg query logger (``Connection.add_query_logger``) when it opens
(``EventBus(init_connection=...)``), which sees every statement the pools send, including BEGIN/COMMIT and the
reset asyncpg runs when a connection goes back to its pool. Not counted: the relay's session connection (LISTEN,
a ping every heartbeat), which is per relay and per time, not per event. The JSON file also has the database-wide
``xact_commit + xact_rollback`` delta of ``pg_stat_database`` as a rough cross-check (it includes every other
client of the database, and PostgreSQL flushes those counters lazily).

Baseline, same run and configuration: one subscriber, no failures.
"""

from __future__ import annotations

import random
from collections import Counter
from time import perf_counter
from typing import Any

import anyio
import asyncpg

from eventbus import Backoff, EventBus, RelayConfig
from eventbus.sql import Queries

from ._common import Outcome, Row, Settings, scratch_schema
from .burndown import Item, fill, time_limit, wait_settled

NAME = "fanout"
POOL_SIZE = 10
BACKGROUND = {"relay_heartbeat", "relay_alive", "partition_busy", "relay_forget", "reclaim", "renew", "ping"}


class StatementCounter:
    """An asyncpg query logger that counts statements by the named query they run."""

    def __init__(self, schema: str) -> None:
        self.by_sql = {query.sql: name for name, query in Queries(schema).by_name.items()}
        self.counts: Counter[str] = Counter()
        self.enabled = False

    def __call__(self, record: Any) -> None:
        if not self.enabled:
            return
        query: str = record.query
        name = self.by_sql.get(query)
        if name is None:
            text = query.lstrip().upper()
            if text.startswith(("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")):
                name = text.split()[0]
            elif "PG_ADVISORY_UNLOCK_ALL" in text or "RESET ALL" in text:
                name = "pool reset (on release)"
            elif "'JIT'" in text or "PG_CATALOG.PG_TYPE" in text:
                name = "asyncpg type introspection"
            else:
                name = "other: " + " ".join(query.split())[:40]
        self.counts[name] += 1


async def _transactions(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    ))  # fmt: skip


async def _run(dsn: str, count: int, subscribers: int, failure_rate: float) -> dict[str, Any]:
    async with scratch_schema(dsn, NAME) as schema:
        fill_s = await fill(dsn, schema, count)
        rng = random.Random(1234)
        done: list[set[int]] = [set() for _ in range(subscribers)]
        all_done = anyio.Event()
        complete = 0
        attempts = failures = 0
        config = RelayConfig(batch_size=500, poll_interval=0.05)
        counter = StatementCounter(schema)
        instrumented = 0

        async def instrument(conn: asyncpg.Connection) -> None:
            nonlocal instrumented
            conn.add_query_logger(counter)
            instrumented += 1

        bus = EventBus(
            dsn, schema=schema, migrate=False, pool_size=POOL_SIZE, relay_config=config, init_connection=instrument
        )

        def make(index: int) -> Any:
            async def handler(event: Item) -> None:
                nonlocal attempts, failures, complete
                attempts += 1
                if rng.random() < failure_rate:
                    failures += 1
                    raise RuntimeError("injected failure")
                seen = done[index]
                if event.seq not in seen:
                    seen.add(event.seq)
                    if len(seen) == count:
                        complete += 1
                        if complete == subscribers:
                            all_done.set()

            return handler

        backoff = Backoff(initial=0.005, factor=2.0, maximum=0.1, jitter=0.0)
        for index in range(subscribers):
            bus.subscribe(make(index), name=f"fanout_{index}", timeout=5, max_attempts=10, backoff=backoff)

        watcher = await asyncpg.connect(dsn)
        try:
            await bus.connect()
            xact_before = await _transactions(watcher)
            counter.enabled = True
            started = perf_counter()
            async with bus:  # the waits are bounded inside, so the bus always stops normally
                with anyio.move_on_after(time_limit(count)) as limit:
                    await all_done.wait()
                    await wait_settled(watcher, schema)
                seconds = perf_counter() - started
                counter.enabled = False
                stats = bus.statistics()
            if limit.cancelled_caught:
                raise TimeoutError(f"fan-out of {count} events did not finish within {time_limit(count):g} s")
            await anyio.sleep(0.6)  # let backends flush their transaction counters (best effort)
            xact_after = await _transactions(watcher)
        finally:
            await watcher.close()
        total = sum(counter.counts.values())
        background = sum(n for name, n in counter.counts.items() if name in BACKGROUND)
        return {
            "events": count,
            "subscribers": subscribers,
            "failure_rate": failure_rate,
            "seconds": seconds,
            "events_per_s": count / seconds,
            "deliveries_per_s": count * subscribers / seconds,
            "attempts": attempts,
            "failures": failures,
            "dead_lettered": stats.dead_lettered,
            "relay_batches": stats.relay.batches if stats.relay else None,
            "relay_settled_rows": stats.relay.settled if stats.relay else None,
            "instrumented_connections": instrumented,
            "statements": dict(counter.counts.most_common()),
            "statements_total": total,
            "statements_per_event": total / count,
            "statements_per_event_without_background": (total - background) / count,
            "pg_stat_database_transactions_delta": xact_after - xact_before,
            "pg_stat_database_transactions_per_event": (xact_after - xact_before) / count,
            "fill_seconds": fill_s,
        }


def _top(statements: dict[str, int], count: int) -> str:
    return ", ".join(f"{name} {n / count:.3f}" for name, n in list(statements.items())[:4])


async def run(settings: Settings) -> Outcome:
    count = 5_000 if settings.quick else 50_000
    print(f"  fanout {count} events: 4 subscribers, 1% of attempts failing ...", flush=True)
    ours = await _run(settings.dsn, count, subscribers=4, failure_rate=0.01)
    print(f"  fanout {count} events: baseline, 1 subscriber, no failures ...", flush=True)
    base = await _run(settings.dsn, count, subscribers=1, failure_rate=0.0)
    outcome = Outcome(details={
        "method": "exact client-side count: asyncpg query loggers on every connection of the bus's pools, the "
                  "relay's included (relay session connection excluded); pg_stat_database delta is database-wide "
                  "and approximate",
        "fanout": ours, "baseline": base,
    })  # fmt: skip
    label = "1 sub, 0% fail"
    outcome.rows += [
        Row.compare(NAME, "4 subs, 1% fail", "events", ours["events_per_s"], "ev/s", base["events_per_s"], label,
                    note=f"{ours['deliveries_per_s']:,.0f} deliveries/s; {ours['failures']} failed attempts, "
                    f"{ours['dead_lettered']} dead"),
        Row.compare(NAME, "4 subs, 1% fail", "statements/event", ours["statements_per_event"], "stmt",
                    base["statements_per_event"], label, note=_top(ours["statements"], count)),
        Row.compare(NAME, "4 subs, 1% fail", "stmts/event w/o heartbeat", ours[
                    "statements_per_event_without_background"], "stmt",
                    base["statements_per_event_without_background"], label,
                    note="exact (query loggers on all pool conns)"),
    ]  # fmt: skip
    return outcome
