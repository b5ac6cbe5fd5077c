"""Commit-to-handler-start latency at a steady producer rate, with LISTEN/NOTIFY and with polling only.

A producer commits one event per transaction on its own pool, on a fixed schedule (slot ``i`` is due at
``t0 + i / rate``; a late slot is sent at once, so the schedule never drifts). The commit time is taken with
``time.perf_counter`` right after COMMIT returns (before the connection goes back to the pool, whose reset is
another round trip). It cannot travel inside the event: the payload is written before the commit. So the
event carries its sequence number, and the commit time waits in a dict of this process; the handler records
``perf_counter`` at entry under the same number. Latency = handler entry - commit.

Caveat: the commit time is read when the producer's task resumes after COMMIT; when the event loop (or the
machine) is busy, that is late, which shortens the measured latency. A negative ``min`` in the JSON file shows
how late it got (the handler, or the raw notification, was seen before the producer resumed).

Baseline, same run, same producer schedule and pool size: raw asyncpg, one connection LISTENs while the
producer runs ``pg_notify`` in a committed transaction; latency = notification receipt - commit.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import anyio
import asyncpg
import msgspec

from eventbus import EventBus, RelayConfig, Transaction

from ._common import Outcome, Row, Settings, scratch_schema, summary_ms

NAME = "latency"
PRODUCER_CONNECTIONS = 8  # more than the rate needs: a late slot goes out at once on a free connection
WARMUP = 0.5  # seconds of the schedule left out of the figures (pool growth, first plans)
POLL_INTERVAL = 0.05


class Tick(msgspec.Struct, frozen=True):
    seq: int
    sent: float  # perf_counter before the transaction began (diagnostic only)


@dataclass(slots=True)
class ProducerRun:
    rate: float
    t0: float
    committed: dict[int, float] = field(default_factory=dict)
    lag: list[float] = field(default_factory=list)  # how late each slot started, seconds
    errors: int = 0
    last_error: str | None = None
    finished: float = 0.0

    def achieved_rate(self, skip: int) -> float | None:
        times = sorted(t for seq, t in self.committed.items() if seq >= skip)
        if len(times) < 2:
            return None
        return (len(times) - 1) / (times[-1] - times[0])


async def steady_producer(
    publish_one: Callable[[int], Awaitable[float]], rate: float, duration: float, workers: int
) -> ProducerRun:
    """Call ``publish_one(seq)`` on a fixed schedule; it returns the commit time."""
    total = int(rate * duration)
    run = ProducerRun(rate=rate, t0=perf_counter() + 0.05)
    next_seq = 0

    async def worker() -> None:
        nonlocal next_seq
        while next_seq < total:
            seq = next_seq
            next_seq += 1
            due = run.t0 + seq / rate
            delay = due - perf_counter()
            if delay > 0:
                await anyio.sleep(delay)
            run.lag.append(max(0.0, perf_counter() - due))
            try:
                run.committed[seq] = await publish_one(seq)
            except Exception as exc:
                run.errors += 1
                run.last_error = f"{type(exc).__name__}: {exc}"
                if run.errors > 100:
                    raise

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
    run.finished = perf_counter()
    return run


class Arrivals:
    """Arrival times by sequence number, and a wait for the first ``wanted`` of them."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._wanted: int | None = None
        self._all = anyio.Event()

    def record(self, seq: int) -> None:
        self.times[seq] = perf_counter()
        if self._wanted is not None and len(self.times) >= self._wanted:
            self._all.set()

    async def wait_for(self, wanted: int, timeout: float) -> None:
        self._wanted = wanted
        if len(self.times) >= wanted:
            return
        with anyio.move_on_after(timeout):
            await self._all.wait()


def _latencies(run: ProducerRun, received: dict[int, float], skip: int) -> tuple[list[float], int]:
    measured = [seq for seq in run.committed if seq >= skip]
    values = [received[seq] - run.committed[seq] for seq in measured if seq in received]
    return values, len(measured) - len(values)


async def _raw_notify(dsn: str, rate: float, duration: float) -> dict[str, Any]:
    channel = f"bench_latency_{secrets.token_hex(4)}"
    received = Arrivals()

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        received.record(int(payload))

    listener = await asyncpg.connect(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=PRODUCER_CONNECTIONS, max_size=PRODUCER_CONNECTIONS)
    try:
        await listener.add_listener(channel, on_notify)

        async def publish_one(seq: int) -> float:
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await conn.execute("SELECT pg_notify($1, $2)", channel, str(seq))
                return perf_counter()

        run = await steady_producer(publish_one, rate, duration, PRODUCER_CONNECTIONS)
        await received.wait_for(len(run.committed), 3.0)
    finally:
        with anyio.CancelScope(shield=True):
            await pool.close()
            await listener.close()
    return latency_report(run, received.times, {})


async def eventbus_latency(dsn: str, rate: float, duration: float, config: RelayConfig) -> dict[str, Any]:
    async with scratch_schema(dsn, NAME) as schema:
        started = Arrivals()
        consumer = EventBus(dsn, schema=schema, relay_config=config, migrate=False)

        @consumer.subscribe(name="latency_probe", timeout=5, max_attempts=3)
        async def probe(event: Tick) -> None:
            started.record(event.seq)

        # The producer has its own bus (no relay) and so its own pool: the relay's claims never queue behind it.
        producer = EventBus(dsn, schema=schema, relay=False, migrate=False, pool_size=PRODUCER_CONNECTIONS)
        async with consumer:
            await producer.connect()
            try:
                await grow_pool(producer.pool, PRODUCER_CONNECTIONS)

                async def publish_one(seq: int) -> float:
                    # What bus.transaction() does, with the clock read between COMMIT and the pool's reset.
                    async with producer.pool.acquire() as conn:
                        async with conn.transaction():
                            await Transaction(producer, conn).publish(Tick(seq, perf_counter()))
                        return perf_counter()

                run = await steady_producer(publish_one, rate, duration, PRODUCER_CONNECTIONS)
                await started.wait_for(len(run.committed), max(3.0, config.poll_interval * 3))
            finally:
                await producer.close()
            stats = consumer.statistics()
        relay = stats.relay
        extra = {
            "delivered": stats.delivered,
            "failed": stats.failed,
            "relay_batches": relay.batches if relay else None,
            "relay_claimed": relay.claimed if relay else None,
            "mean_batch": (relay.claimed / relay.batches) if relay and relay.batches else None,
            "config": {
                "use_notify": config.use_notify, "poll_interval": config.poll_interval,
                "batch_size": config.batch_size, "max_batches_in_flight": config.max_batches_in_flight,
            },
        }  # fmt: skip
        return latency_report(run, started.times, extra)


async def grow_pool(pool: asyncpg.Pool, size: int) -> None:
    """Open every connection of ``pool`` now, so pool growth does not land in the measured window."""
    async with anyio.create_task_group() as tg:
        for _ in range(size):

            async def hold() -> None:
                async with pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
                    await anyio.sleep(0.05)

            tg.start_soon(hold)


def latency_report(run: ProducerRun, received: dict[int, float], extra: dict[str, Any]) -> dict[str, Any]:
    skip = int(run.rate * WARMUP)
    values, lost = _latencies(run, received, skip)
    lag = summary_ms(run.lag[skip:])
    quarter = max(1, len(values) // 4)
    by_quarter = [summary_ms(values[i : i + quarter])["p50"] for i in range(0, len(values), quarter)][:4]
    return {
        "target_rate": run.rate,
        "achieved_rate": run.achieved_rate(skip),
        "committed": len(run.committed),
        "measured": len(values),
        "missing": lost,
        "producer_errors": run.errors,
        "producer_last_error": run.last_error,
        "schedule_lag_ms": {k: lag[k] for k in ("p50", "p99", "max")},
        "latency_ms": summary_ms(values),
        # p50 of each quarter of the run, in send order: a rise means claims slow down as the table grows.
        "p50_by_quarter_ms": by_quarter,
        **extra,
    }


async def run(settings: Settings) -> Outcome:
    rates = [500.0] if settings.quick else [500.0, 2000.0]
    duration = 5.0 if settings.quick else 15.0
    outcome = Outcome()
    outcome.details = {"duration_s": duration, "warmup_s": WARMUP, "producer_connections": PRODUCER_CONNECTIONS}
    notify_config = RelayConfig(use_notify=True, poll_interval=1.0)
    poll_config = RelayConfig(use_notify=False, poll_interval=POLL_INTERVAL)
    for rate in rates:
        print(f"  latency @ {rate:g}/s: raw LISTEN/NOTIFY baseline ...", flush=True)
        raw = await _raw_notify(settings.dsn, rate, duration)
        print(f"  latency @ {rate:g}/s: eventbus with LISTEN/NOTIFY ...", flush=True)
        notify = await eventbus_latency(settings.dsn, rate, duration, notify_config)
        print(f"  latency @ {rate:g}/s: eventbus polling every {POLL_INTERVAL * 1000:g} ms ...", flush=True)
        poll = await eventbus_latency(settings.dsn, rate, duration, poll_config)
        outcome.details[f"{rate:g}/s"] = {"raw_notify": raw, "eventbus_notify": notify, "eventbus_poll": poll}

        base = raw["latency_ms"]
        raw_label = f"raw NOTIFY {rate:g}/s"
        outcome.rows.append(
            Row.compare(NAME, f"raw NOTIFY @{rate:g}/s", "achieved rate", raw["achieved_rate"], "ev/s", rate,
                        "target", note=f"p50 {_ms(base['p50'])}, p99 {_ms(base['p99'])}, min {_ms(base['min'])}, "
                        f"missing {raw['missing']}")
        )  # fmt: skip
        for label, result in ((f"notify @{rate:g}/s", notify), (f"poll {POLL_INTERVAL * 1000:g}ms @{rate:g}/s", poll)):
            ours = result["latency_ms"]
            note = (
                f"missing {result['missing']}, schedule lag p99 {_ms(result['schedule_lag_ms']['p99'])}, "
                f"p50 by quarter {' '.join(f'{q:.1f}' for q in result['p50_by_quarter_ms'] if q is not None)} ms"
            )
            for metric in ("p50", "p99", "p99.9"):
                outcome.rows.append(Row.compare(NAME, label, metric, ours[metric], "ms", base[metric], raw_label))
            outcome.rows.append(
                Row.compare(NAME, label, "achieved rate", result["achieved_rate"], "ev/s", rate, "target", note=note)
            )
        outcome.rows.append(
            Row.compare(NAME, f"poll {POLL_INTERVAL * 1000:g}ms @{rate:g}/s", "p99 / poll interval",
                        poll["latency_ms"]["p99"], "ms", POLL_INTERVAL * 1000, "poll interval")
        )  # fmt: skip
    return outcome


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"
