"""The parent side of the steady producer, shared by latency.py and peer.py (imports no benchmark module).

:func:`run_producer` runs a producer of :mod:`benchmarks._producer` in a child process, :class:`Arrivals` records
when each sequence number arrived in this process, and :func:`latency_report` turns both into latency figures.
"""

from __future__ import annotations

import json
import math
import sys
from time import monotonic
from typing import Any

import anyio

from ._common import REPO_ROOT, summary_ms
from ._producer import ProducerRun

PRODUCER_CONNECTIONS = 8  # more than the rate needs: a late slot goes out at once on a free connection
WARMUP = 0.5  # seconds of the schedule left out of the figures (caches, autovacuum of a fresh table, ...)


async def run_producer(kind: str, dsn: str, rate: float, duration: float, **target: str) -> ProducerRun:
    """Run the ``kind`` producer of :mod:`benchmarks._producer` in a child process until its schedule is done.

    ``target``: ``schema`` and/or ``channel``; ``notify`` ("" for no) for the eventbus producer. The spec goes
    through stdin (the DSN may hold a password).
    """
    spec = {"kind": kind, "dsn": dsn, "rate": rate, "duration": duration, "connections": PRODUCER_CONNECTIONS,
            **target}  # fmt: skip
    done = await anyio.run_process(
        [sys.executable, "-m", "benchmarks._producer"], input=json.dumps(spec).encode(), cwd=REPO_ROOT, check=False
    )
    errors = done.stderr.decode(errors="replace").strip()
    if done.returncode != 0:
        tail = " | ".join(errors.splitlines()[-3:])
        raise RuntimeError(f"the {kind} producer process exited with {done.returncode}: {tail}")
    if errors:
        print(errors, file=sys.stderr)
    return ProducerRun.from_json(json.loads(done.stdout))


class Arrivals:
    """Arrival times by sequence number, and a wait for the first ``wanted`` of them."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._wanted: int | None = None
        self._all = anyio.Event()

    def record(self, seq: int) -> None:
        self.times[seq] = monotonic()
        if self._wanted is not None and len(self.times) >= self._wanted:
            self._all.set()

    async def wait_for(self, wanted: int, timeout: float) -> None:
        self._wanted = wanted
        if len(self.times) >= wanted:
            return
        with anyio.move_on_after(timeout):
            await self._all.wait()


def _latencies(committed: dict[int, float], received: dict[int, float], skip: int) -> tuple[list[float], int]:
    measured = sorted(seq for seq in committed if seq >= skip)
    values = [received[seq] - committed[seq] for seq in measured if seq in received]
    return values, len(measured) - len(values)


def latency_report(run: ProducerRun, received: dict[int, float], extra: dict[str, Any]) -> dict[str, Any]:
    skip = int(run.rate * WARMUP)
    committed = run.committed
    values, lost = _latencies(committed, received, skip)
    lag = summary_ms(run.lag[math.ceil(skip / run.events_per_tx) :])
    quarter = max(1, math.ceil(len(values) / 4))
    by_quarter = [summary_ms(values[i : i + quarter])["p50"] for i in range(0, len(values), quarter)][:4]
    return {
        "target_rate": run.rate,
        "achieved_rate": run.achieved_rate(skip),
        "events_per_tx": run.events_per_tx,
        "producer": "child process",
        "committed": len(committed),
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
