"""Commit-to-handler-start latency at a steady producer rate, with LISTEN/NOTIFY and with polling only.

The producer runs in a child process (``python -m benchmarks._producer``), as producers do in production: in the
consumer's process it would share the event loop (and the GIL) with the relay and the handlers, fall behind its
schedule at a few thousand events/s and delay the handlers it measures. It commits on its own pool on a fixed
schedule (slot ``i`` is due at ``t0 + i * events_per_tx / rate``; a late slot is sent at once, so the schedule
never drifts), one event per transaction up to 2000 events/s and ``ceil(rate / 2000)`` events per transaction
above (one producer process alone reaches about 2000 transactions/s on a 2-core machine); the latency of every
event is from its transaction's commit. Before the schedule starts, every producer connection runs the producer's
statements once in a rolled-back transaction (prepared statements, first plans). On a 2-core machine the NOTIFY
case at 2000/s saturates both cores (producer, relay woken for batches of about 4 events, PostgreSQL), and the
producer falls behind: the latency figures are then those of the achieved rate, which its row shows.

The commit time is ``time.monotonic()`` right after ``bus.transaction()`` returns (its COMMIT, the connection's
reset and the wake-up are one round trip). It cannot travel inside the event: the payload is written before the commit.
So the event carries its sequence number, the child sends its commit times by sequence number back at the end,
and the handler (in this process) records ``time.monotonic()`` at entry under the same number. CLOCK_MONOTONIC is
one clock for all processes of a Linux machine. Latency = handler entry - commit.

Caveat: the commit time is read when the producer's task resumes after COMMIT; when the child (or the machine) is
busy, that is late, which shortens the measured latency. A negative ``min`` in the JSON file shows how late it got
(the handler, or the raw notification, was seen before the producer resumed).

Baseline, same run, same producer schedule, pool size and events per transaction, also in a child process: raw
asyncpg, one connection (in this process) LISTENs while the producer runs ``pg_notify`` in a committed
transaction; latency = notification receipt - commit.
"""

from __future__ import annotations

import secrets
from typing import Any

import anyio
import asyncpg

from eventbus import EventBus, RelayConfig

from ._common import Outcome, Row, Settings, scratch_schema
from ._producer import ProducerRun, Tick, grow_pool, steady_producer
from ._steady import PRODUCER_CONNECTIONS, WARMUP, Arrivals, latency_report, run_producer

__all__ = ["Arrivals", "ProducerRun", "Tick", "eventbus_latency", "grow_pool", "latency_report", "run_producer",
           "steady_producer"]  # fmt: skip

NAME = "latency"
POLL_INTERVAL = 0.05


async def _raw_notify(dsn: str, rate: float, duration: float) -> dict[str, Any]:
    channel = f"bench_latency_{secrets.token_hex(4)}"
    received = Arrivals()

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        received.record(int(payload))

    listener = await asyncpg.connect(dsn)
    try:
        await listener.add_listener(channel, on_notify)
        run = await run_producer("raw_notify", dsn, rate, duration, channel=channel)
        await received.wait_for(len(run.committed), 3.0)
    finally:
        with anyio.CancelScope(shield=True):
            await listener.close()
    return latency_report(run, received.times, {})


async def eventbus_latency(dsn: str, rate: float, duration: float, config: RelayConfig) -> dict[str, Any]:
    async with scratch_schema(dsn, NAME) as schema:
        started = Arrivals()
        consumer = EventBus(dsn, schema=schema, relay_config=config, migrate=False)

        @consumer.subscribe(name="latency_probe", timeout=5, max_attempts=3)
        async def probe(event: Tick) -> None:
            started.record(event.seq)

        # The producer is a bus of its own (no relay, its own pool) in a child process: see the module docstring.
        async with consumer:
            # Polling relays need no wake-up: that producer commits without NOTIFY (EventBus(notify=False)).
            notify = "1" if config.use_notify else ""
            run = await run_producer("eventbus", dsn, rate, duration, schema=schema, notify=notify)
            await started.wait_for(len(run.committed), max(3.0, config.poll_interval * 3))
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


def tx_note(result: dict[str, Any]) -> str:
    """``", 3 events/tx"`` when the producer batched events into transactions, else nothing."""
    n = result["events_per_tx"]
    return f", {n} events/tx (latency from the tx's commit)" if n > 1 else ""


async def run(settings: Settings) -> Outcome:
    rates = [500.0, 2000.0] if settings.quick else [500.0, 2000.0, 5000.0]
    duration = 5.0 if settings.quick else 15.0
    outcome = Outcome()
    outcome.details = {"duration_s": duration, "warmup_s": WARMUP, "producer_connections": PRODUCER_CONNECTIONS,
                       "producer": "child process, time.monotonic (CLOCK_MONOTONIC) on both sides"}  # fmt: skip
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
                        f"missing {raw['missing']}, schedule lag p99 {_ms(raw['schedule_lag_ms']['p99'])}"
                        f"{tx_note(raw)}")
        )  # fmt: skip
        for label, result in ((f"notify @{rate:g}/s", notify), (f"poll {POLL_INTERVAL * 1000:g}ms @{rate:g}/s", poll)):
            ours = result["latency_ms"]
            note = (
                f"missing {result['missing']}, schedule lag p99 {_ms(result['schedule_lag_ms']['p99'])}, "
                f"p50 by quarter {' '.join(f'{q:.1f}' for q in result['p50_by_quarter_ms'] if q is not None)} ms"
                f"{tx_note(result)}"
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
