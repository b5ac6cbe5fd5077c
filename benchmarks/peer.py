"""A peer on the same server in the same run: pgqueuer, a PostgreSQL job queue, beside eventbus.

pgqueuer gets a schema of its own for every case (``bench_peer_<hex>``, through ``DBSettings(db_schema=...)``),
installed with its ``Queries.install`` and dropped afterwards; its NOTIFY channel is named after that schema, so
nothing it creates is shared with eventbus's schemas or with another pgqueuer installation on the server.

- Burn-down: N no-op jobs enqueued beforehand (chunks of 5000 per statement, then ``VACUUM (ANALYZE)``, as
  burndown.py fills the outbox), drained by one ``QueueManager`` on one connection with a no-op entrypoint. The
  clock starts when ``QueueManager.run`` starts and stops once the queue table is empty: pgqueuer deletes a job
  when it logs its completion, as eventbus's figure stops when no outbox row is pending or claimed. pgqueuer runs
  at the relay's batch size and at its own default batch size (10). eventbus's figure is burndown.py's relay drain
  of the same N at the same batch size, in this run. Ratio: eventbus / pgqueuer (above 1: eventbus is faster).
- Steady state: latency.py's producer (in a child process), schedule, pool size and warm-up; each slot enqueues
  one job (``ceil(rate / 2000)`` jobs above 2000/s) in a committed transaction; latency = entrypoint start -
  commit, with pgqueuer woken by its LISTEN/NOTIFY trigger (its poll, ``dequeue_timeout``, set to latency.py's
  1 s relay poll). eventbus's figure is latency.py's NOTIFY case at the same rate, in this run. Ratio:
  eventbus / pgqueuer (below 1: eventbus is quicker).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from importlib.metadata import version
from time import perf_counter
from typing import Any

import anyio
import asyncpg

from eventbus import RelayConfig

from . import burndown, latency
from ._common import Outcome, Row, Settings, drop_schema, schema_name, scratch_schema, vacuum_analyze
from ._peerdb import ENTRYPOINT, load_pgqueuer, queries_for
from ._steady import WARMUP, Arrivals, latency_report, run_producer

NAME = "peer"
BATCH_SIZE = 500  # the relay's default batch size, used by both sides of the burn-down
PGQUEUER_DEFAULT_BATCH = 10  # QueueManager.run's default
CHUNK = 5000
STOP_TIMEOUT = 10.0  # seconds a QueueManager may take to shut down before it is cancelled


@asynccontextmanager
async def pgqueuer_schema(dsn: str) -> AsyncIterator[Any]:
    """pgqueuer installed in a fresh schema; yields its ``DBSettings``; the schema is dropped afterwards."""
    schema = schema_name(NAME)
    settings = load_pgqueuer().qb.DBSettings(db_schema=schema, channel=f"{schema}_ch")
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await queries_for(conn, settings).install()
        finally:
            await conn.close()
        yield settings
    finally:
        await drop_schema(dsn, schema)


async def fill(dsn: str, settings: Any, count: int) -> float:
    """Enqueue ``count`` no-op jobs, ``CHUNK`` per statement; return the seconds it took (with VACUUM)."""
    started = perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        queries = queries_for(conn, settings)
        for first in range(0, count, CHUNK):
            seqs = range(first, min(count, first + CHUNK))
            await queries.enqueue([ENTRYPOINT] * len(seqs), [str(seq).encode() for seq in seqs], [0] * len(seqs))
    finally:
        await conn.close()
    await vacuum_analyze(dsn, settings.db_schema, settings.queue_table)
    return perf_counter() - started


@asynccontextmanager
async def queue_manager(
    dsn: str, settings: Any, entrypoint: Callable[[Any], Awaitable[None]], **run_options: Any
) -> AsyncIterator[Any]:
    """A running ``QueueManager`` on a connection of its own, with ``entrypoint`` registered; stopped on exit
    (asked to shut down, then cancelled after ``STOP_TIMEOUT``)."""
    conn = await asyncpg.connect(dsn)
    try:
        # The channel must be given: QueueManager takes it from the process-wide settings, not from its queries.
        qm = load_pgqueuer().QueueManager(queries_for(conn, settings), channel=settings.channel)
        qm.entrypoint(ENTRYPOINT)(entrypoint)
        stopped = anyio.Event()

        async def run_queue_manager() -> None:
            try:
                await qm.run(**run_options)
            finally:
                stopped.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_queue_manager)
            try:
                yield qm
            finally:
                qm.shutdown.set()
                with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_TIMEOUT):
                    await stopped.wait()
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


async def pgqueuer_drain(dsn: str, settings: Any, count: int, batch_size: int) -> dict[str, Any]:
    """Drain ``count`` enqueued jobs with one QueueManager; time until the queue table is empty."""
    handled = 0
    all_handled = anyio.Event()

    async def noop(job: Any) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            all_handled.set()

    table = settings.qualified.queue_table
    watcher = await asyncpg.connect(dsn)
    try:
        started = perf_counter()
        async with queue_manager(dsn, settings, noop, batch_size=batch_size):
            with anyio.move_on_after(burndown.time_limit(count)) as limit:
                await all_handled.wait()
                while await watcher.fetchval(f"SELECT EXISTS (SELECT FROM {table})"):  # noqa: ASYNC110
                    await anyio.sleep(0.005)
            seconds = perf_counter() - started
        left = await watcher.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        await watcher.close()
    if limit.cancelled_caught:
        raise TimeoutError(
            f"pgqueuer did not drain {count} jobs within {burndown.time_limit(count):g} s ({handled} handled)"
        )
    return {"events": count, "handled": handled, "left": left, "seconds": seconds, "events_per_s": count / seconds,
            "batch_size": batch_size}  # fmt: skip


async def pgqueuer_latency(dsn: str, rate: float, duration: float) -> dict[str, Any]:
    """latency.py's steady producer (a child process) enqueueing pgqueuer jobs; latency = entrypoint start -
    commit."""
    started = Arrivals()

    async def probe(job: Any) -> None:
        started.record(int(job.payload))

    async with (
        pgqueuer_schema(dsn) as settings,
        queue_manager(dsn, settings, probe, dequeue_timeout=timedelta(seconds=1.0)) as qm,
    ):
        await _wait_listening(qm)
        run = await run_producer("pgqueuer", dsn, rate, duration, schema=settings.db_schema, channel=settings.channel)
        await started.wait_for(len(run.committed), 3.0)
    return latency_report(run, started.times, {"dequeue_timeout_s": 1.0,
                                               "batch_size": PGQUEUER_DEFAULT_BATCH})  # fmt: skip


async def _wait_listening(qm: Any, timeout: float = 10.0) -> None:
    """Return once the QueueManager receives its own notifications (its LISTEN is in place)."""
    failing = load_pgqueuer().FailingListenerError
    with anyio.fail_after(timeout):
        while True:
            try:
                await qm.listener_healthy(timeout=timedelta(seconds=0.2))
                return
            except failing:
                await anyio.sleep(0.01)


async def run(settings: Settings) -> Outcome:
    count = 20_000 if settings.quick else 200_000
    rates = [2000.0] if settings.quick else [500.0, 2000.0]
    duration = 5.0 if settings.quick else 15.0
    outcome = Outcome(details={"events": count, "chunk": CHUNK, "duration_s": duration, "warmup_s": WARMUP,
                               "pgqueuer": version("pgqueuer")})  # fmt: skip

    async with scratch_schema(settings.dsn, NAME) as schema:
        fill_s = await burndown.fill(settings.dsn, schema, count)
        print(f"  burn-down {count}: eventbus relay, batch {BATCH_SIZE} (filled in {fill_s:.1f} s) ...", flush=True)
        ours = await burndown.relay_drain(settings.dsn, schema, count, BATCH_SIZE)
        ours["fill_seconds"] = fill_s
    drains: dict[int, dict[str, Any]] = {}
    for batch_size in (BATCH_SIZE, PGQUEUER_DEFAULT_BATCH):
        async with pgqueuer_schema(settings.dsn) as pgq:
            fill_s = await fill(settings.dsn, pgq, count)
            print(f"  burn-down {count}: pgqueuer, batch {batch_size} (filled in {fill_s:.1f} s) ...", flush=True)
            drains[batch_size] = await pgqueuer_drain(settings.dsn, pgq, count, batch_size)
            drains[batch_size]["fill_seconds"] = fill_s
    outcome.details["burndown"] = {"eventbus_relay": ours, **{f"pgqueuer_b{b}": d for b, d in drains.items()}}
    for batch_size, theirs in drains.items():
        outcome.rows.append(
            Row.compare(NAME, f"burn-down {count}", f"eventbus relay b={BATCH_SIZE}", ours["events_per_s"], "ev/s",
                        theirs["events_per_s"], f"pgqueuer b={batch_size}",
                        note=f"pgqueuer fill {count / theirs['fill_seconds']:,.0f} jobs/s")
        )  # fmt: skip

    notify_config = RelayConfig(use_notify=True, poll_interval=1.0)  # latency.py's NOTIFY case
    for rate in rates:
        print(f"  steady {rate:g}/s: eventbus with LISTEN/NOTIFY ...", flush=True)
        ours = await latency.eventbus_latency(settings.dsn, rate, duration, notify_config)
        print(f"  steady {rate:g}/s: pgqueuer with LISTEN/NOTIFY ...", flush=True)
        theirs = await pgqueuer_latency(settings.dsn, rate, duration)
        outcome.details[f"{rate:g}/s"] = {"eventbus_notify": ours, "pgqueuer_notify": theirs}
        label = f"pgqueuer @{rate:g}/s"
        for metric in ("p50", "p99"):
            outcome.rows.append(
                Row.compare(NAME, f"notify @{rate:g}/s", f"eventbus {metric}", ours["latency_ms"][metric], "ms",
                            theirs["latency_ms"][metric], label)
            )  # fmt: skip
        # A producer that falls behind its schedule offers less load: compare latencies only at like rates.
        for who, result in (("eventbus", ours), ("pgqueuer", theirs)):
            outcome.rows.append(
                Row.compare(NAME, f"notify @{rate:g}/s", f"{who} achieved rate", result["achieved_rate"], "ev/s",
                            rate, "target", note=f"missing {result['missing']}, "
                            f"schedule lag p99 {result['schedule_lag_ms']['p99']:.2f} ms")
            )  # fmt: skip
    return outcome
