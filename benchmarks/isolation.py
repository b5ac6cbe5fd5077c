"""Isolation: a subscriber that hangs, or an ordered subscriber whose keys retry, must not delay the others.

1. A fast subscriber's commit-to-handler latency at 500 events/s, alone (the baseline, same run) and beside a
   neighbour that hangs on every event until its timeout (2 s; one attempt, then a dead letter). Target: p99 with
   the neighbour <= 1.5x p99 alone + 5 ms. The producer runs in a child process, as in ``latency``.
2. The delay an unrelated event (another topic, another subscriber) sees while an ordered subscriber retries
   three keys in place (backoff 1 s, every attempt failing): commit to handler start, over 20 such events, against
   the relay's poll interval (1 s). Target: under one poll interval.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import anyio
import msgspec

from eventbus import Backoff, EventBus, RelayConfig

from ._common import Outcome, Row, Settings, scratch_schema, summary_ms
from ._producer import Tick
from ._steady import Arrivals, latency_report, run_producer

NAME = "isolation"
RATE = 500.0
HANG_TIMEOUT = 2.0
POLL = 1.0


async def _fast_latency(dsn: str, duration: float, *, hung_neighbour: bool) -> dict[str, Any]:
    async with scratch_schema(dsn, NAME) as schema:
        started = Arrivals()
        consumer = EventBus(dsn, schema=schema, relay_config=RelayConfig(poll_interval=POLL), migrate=False,
                            stop_timeout=0.5)  # fmt: skip

        @consumer.subscribe(name="fast", timeout=5, max_attempts=3)
        async def fast(event: Tick) -> None:
            started.record(event.seq)

        if hung_neighbour:

            @consumer.subscribe(name="hung", timeout=HANG_TIMEOUT, max_attempts=1)
            async def hung(event: Tick) -> None:
                await anyio.sleep_forever()

        async with consumer:
            run = await run_producer("eventbus", dsn, RATE, duration, schema=schema, notify="1")
            await started.wait_for(len(run.committed), 5.0)
        return latency_report(run, started.times, {"hung_neighbour": hung_neighbour})


class Retried(msgspec.Struct, frozen=True):
    key: str


class Unrelated(msgspec.Struct, frozen=True):
    n: int


async def _unrelated_delay(dsn: str, events: int) -> dict[str, Any]:
    async with scratch_schema(dsn, NAME) as schema:
        bus = EventBus(dsn, schema=schema, relay_config=RelayConfig(poll_interval=POLL), migrate=False,
                       stop_timeout=0.5)  # fmt: skip
        handled: dict[int, float] = {}
        failing = anyio.Event()

        @bus.subscribe(name="ordered", ordered=True, max_attempts=1000, backoff=Backoff(initial=1.0, factor=1.0))
        async def retries(event: Retried) -> None:
            failing.set()
            raise RuntimeError("the dependency is down")

        @bus.subscribe(name="unrelated")
        async def unrelated(event: Unrelated) -> None:
            handled[event.n] = monotonic()

        delays: list[float] = []
        async with bus:
            async with bus.transaction() as tx:
                for key in ("a", "b", "c"):
                    await tx.publish(Retried(key), key=key)
            await failing.wait()
            for n in range(events):
                async with bus.transaction() as tx:
                    await tx.publish(Unrelated(n))
                committed = monotonic()
                with anyio.fail_after(10 * POLL):
                    while n not in handled:  # noqa: ASYNC110 - the handler records the time, the loop only waits
                        await anyio.sleep(0.001)
                delays.append(handled[n] - committed)
                await anyio.sleep(0.1)
        return {"events": events, "delay_ms": summary_ms(delays)}


async def run(settings: Settings) -> Outcome:
    duration = 5.0 if settings.quick else 15.0
    outcome = Outcome()
    print(f"  isolation: fast subscriber alone @ {RATE:g}/s ...", flush=True)
    alone = await _fast_latency(settings.dsn, duration, hung_neighbour=False)
    print(f"  isolation: fast subscriber beside a neighbour hanging {HANG_TIMEOUT:g} s per event ...", flush=True)
    beside = await _fast_latency(settings.dsn, duration, hung_neighbour=True)
    print("  isolation: an unrelated event while ordered keys retry ...", flush=True)
    unrelated = await _unrelated_delay(settings.dsn, 20)
    outcome.details = {"alone": alone, "beside_hung": beside, "unrelated": unrelated}
    a, b = alone["latency_ms"], beside["latency_ms"]
    case = f"fast @{RATE:g}/s beside a hung neighbour"
    for metric in ("p50", "p99"):
        outcome.rows.append(Row.compare(NAME, case, metric, b[metric], "ms", a[metric], "fast alone"))
    target = None if a["p99"] is None else 1.5 * a["p99"] + 5.0
    outcome.rows.append(
        Row.compare(NAME, case, "p99 / target", b["p99"], "ms", target, "1.5x p99 alone + 5 ms",
                    note=f"missing {beside['missing']}, achieved {beside['achieved_rate']:.0f} ev/s")
    )  # fmt: skip
    delay = unrelated["delay_ms"]
    for metric in ("p50", "p99"):
        outcome.rows.append(
            Row.compare(NAME, "unrelated event, ordered keys retrying", metric, delay[metric], "ms", POLL * 1000,
                        "poll interval")
        )  # fmt: skip
    return outcome
