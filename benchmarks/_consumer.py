"""The NATS consumer of ``benchmarks/nats.py``, run in a child process of its own, as consumers run in production.

``python -m benchmarks._consumer`` reads a line of JSON on stdin (``dsn``, ``nats``, ``schema``), starts
``bus.consumer()`` with the latency probe and prints ``ready``. A second line gives how many ticks were
committed; once that many came (or 5 s later), it prints one JSON object: the handler-start time of each sequence
number (``time.monotonic()``, the clock the producer process reads too).
"""

from __future__ import annotations

import json
import sys
from time import monotonic

import anyio
import anyio.to_thread

from eventbus import EventBus, NatsTransport

from ._producer import Tick

PROBE = "latency_probe"


async def main() -> None:
    spec = json.loads(sys.stdin.readline())
    times: dict[int, float] = {}
    expected = 1 << 62
    arrived = anyio.Event()
    bus = EventBus(spec["dsn"], schema=spec["schema"], migrate=False, transport=NatsTransport(spec["nats"]))

    @bus.subscribe(name=PROBE, timeout=5, max_attempts=3, concurrency=4)
    async def probe(event: Tick) -> None:
        times[event.seq] = monotonic()
        if len(times) >= expected:
            arrived.set()

    async with bus.consumer():
        print("ready", flush=True)
        expected = int(await anyio.to_thread.run_sync(sys.stdin.readline) or 0)
        with anyio.move_on_after(5.0):
            if len(times) < expected:
                await arrived.wait()
    print(json.dumps(times), flush=True)


if __name__ == "__main__":
    anyio.run(main)
