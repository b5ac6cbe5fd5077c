"""The steady producer of latency.py and peer.py, run in a child process of its own.

``python -m benchmarks._producer`` reads a JSON spec on stdin (see :func:`main`), opens a pool, commits events
on a fixed schedule and, at the end, prints one JSON object on stdout: per committed transaction its first
sequence number, its number of events and its commit time. Users publish from other processes than their relays;
a producer in the consumer's event loop would compete with the relay and the handlers for it (and for the GIL),
fall behind its schedule at a few thousand events/s and delay the handlers it measures.

Times are ``time.monotonic()``: CLOCK_MONOTONIC on Linux, one clock for every process of the machine, so the
parent can subtract a commit time taken here from a handler-start time taken there.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

import anyio
import asyncpg
import msgspec

from eventbus import EventBus, Transaction
from eventbus._typing import Connection

from ._peerdb import ENTRYPOINT, load_pgqueuer, queries_for

#: Transactions per second one producer process reaches with one event each (on a 2-core machine, with some
#: margin); a higher rate puts ``ceil(rate / TX_RATE_LIMIT)`` events in each transaction.
TX_RATE_LIMIT = 2000.0


class Tick(msgspec.Struct, frozen=True):
    seq: int
    sent: float  # monotonic time before the transaction began (diagnostic only)


@dataclass(slots=True)
class ProducerRun:
    """What a producer did: ``commits`` holds ``(first seq, events, commit time)`` per committed transaction and
    ``lag`` how late each transaction slot started (seconds, by slot)."""

    rate: float
    events_per_tx: int
    commits: list[tuple[int, int, float]] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    errors: int = 0
    last_error: str | None = None

    @property
    def committed(self) -> dict[int, float]:
        """Commit time by sequence number (every event of a transaction has its transaction's)."""
        return {seq: t for first, n, t in self.commits for seq in range(first, first + n)}

    def achieved_rate(self, skip: int) -> float | None:
        """Events per second committed from the first transaction at or after ``skip`` to the last."""
        txs = sorted((t, n) for first, n, t in self.commits if first >= skip)
        if len(txs) < 2 or txs[-1][0] <= txs[0][0]:
            return None
        return sum(n for _, n in txs[1:]) / (txs[-1][0] - txs[0][0])

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "events_per_tx": self.events_per_tx, "commits": self.commits, "lag": self.lag,
                "errors": self.errors, "last_error": self.last_error}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProducerRun:
        return cls(
            rate=data["rate"], events_per_tx=data["events_per_tx"],
            commits=[(int(first), int(n), float(t)) for first, n, t in data["commits"]],
            lag=[float(x) for x in data["lag"]], errors=data["errors"], last_error=data["last_error"],
        )  # fmt: skip


def events_per_tx(rate: float) -> int:
    return max(1, -(-int(rate) // int(TX_RATE_LIMIT)))


async def steady_producer(
    publish_tx: Callable[[int, int], Awaitable[float]], rate: float, duration: float, workers: int, per_tx: int = 1
) -> ProducerRun:
    """Call ``publish_tx(first_seq, count)`` on a fixed schedule; it commits ``count`` events numbered from
    ``first_seq`` in one transaction and returns the commit time.

    Slot ``i`` (events ``i * per_tx`` onwards) is due at ``t0 + i * per_tx / rate``; a late slot is sent at once,
    so the schedule never drifts.
    """
    total = int(rate * duration)
    slots = -(-total // per_tx)
    run = ProducerRun(rate=rate, events_per_tx=per_tx, lag=[0.0] * slots)
    t0 = monotonic() + 0.05
    next_slot = 0

    async def worker() -> None:
        nonlocal next_slot
        while next_slot < slots:
            slot = next_slot
            next_slot += 1
            first = slot * per_tx
            due = t0 + first / rate
            delay = due - monotonic()
            if delay > 0:
                await anyio.sleep(delay)
            run.lag[slot] = max(0.0, monotonic() - due)
            count = min(per_tx, total - first)
            try:
                run.commits.append((first, count, await publish_tx(first, count)))
            except Exception as exc:
                run.errors += 1
                run.last_error = f"{type(exc).__name__}: {exc}"
                if run.errors > 100:
                    raise

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
    return run


async def grow_pool(
    pool: asyncpg.Pool, size: int, rehearse: Callable[[asyncpg.Connection], Awaitable[object]] | None = None
) -> None:
    """Open every connection of ``pool`` now, so pool growth does not land in the measured window.

    ``rehearse(conn)``, when given, runs on every connection in a transaction that is rolled back (nothing is
    committed, no notification is sent): the producer's statements are then prepared before the schedule starts.
    """
    async with anyio.create_task_group() as tg:
        for _ in range(size):

            async def hold() -> None:
                async with pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
                    if rehearse is not None:
                        tx = conn.transaction()
                        await tx.start()
                        try:
                            await rehearse(conn)
                            await rehearse(conn)
                        finally:
                            await tx.rollback()
                    await anyio.sleep(0.05)

            tg.start_soon(hold)


async def _eventbus(spec: dict[str, Any]) -> ProducerRun:
    connections = spec["connections"]
    bus = EventBus(
        spec["dsn"], schema=spec["schema"], relay=False, migrate=False, pool_size=connections,
        notify=bool(spec.get("notify", "1")), tenant=spec.get("tenant", ""),
    )  # fmt: skip
    await bus.start()  # with notify, also the sender of coalesced relay wake-ups
    try:
        per_tx = events_per_tx(spec["rate"])

        async def offer(conn: asyncpg.Connection, first: int, count: int) -> None:
            tx = Transaction(bus, conn)
            sent = monotonic()
            if count == 1:
                await tx.publish(Tick(first, sent))
            else:
                await tx.publish_many([Tick(seq, sent) for seq in range(first, first + count)])

        await grow_pool(bus.pool, connections, lambda conn: offer(conn, -per_tx, per_tx))

        async def publish_tx(first: int, count: int) -> float:
            # The COMMIT and the connection's reset are one round trip, so the clock is read after it; the
            # wake-up follows from the bus's waker, and its delay counts in the latency.
            async with bus.transaction() as tx:
                await offer(tx.connection, first, count)
            return monotonic()

        return await _produce(spec, publish_tx)
    finally:
        await bus.stop()


async def _raw_notify(spec: dict[str, Any]) -> ProducerRun:
    channel = spec["channel"]

    async def notify(conn: Connection, first: int, count: int) -> None:
        if count == 1:
            await conn.execute("SELECT pg_notify($1, $2)", channel, str(first))
        else:
            await conn.execute(
                "SELECT pg_notify($1, s::text) FROM generate_series($2::int, $3::int) AS s",
                channel, first, first + count - 1,
            )  # fmt: skip

    return await _on_plain_pool(spec, notify)


async def _pgqueuer(spec: dict[str, Any]) -> ProducerRun:
    settings = load_pgqueuer().qb.DBSettings(db_schema=spec["schema"], channel=spec["channel"])

    async def enqueue(conn: Connection, first: int, count: int) -> None:
        queries = queries_for(conn, settings)
        if count == 1:
            await queries.enqueue(ENTRYPOINT, str(first).encode())
        else:
            seqs = range(first, first + count)
            await queries.enqueue([ENTRYPOINT] * count, [str(s).encode() for s in seqs], [0] * count)

    return await _on_plain_pool(spec, enqueue)


async def _on_plain_pool(
    spec: dict[str, Any], offer: Callable[[Connection, int, int], Awaitable[None]]
) -> ProducerRun:
    """Produce with ``offer(conn, first_seq, count)`` in one transaction per slot, on a plain asyncpg pool."""
    connections = spec["connections"]
    pool = await asyncpg.create_pool(spec["dsn"], min_size=connections, max_size=connections)
    try:
        per_tx = events_per_tx(spec["rate"])
        await grow_pool(pool, connections, lambda conn: offer(conn, -per_tx, per_tx))

        async def publish_tx(first: int, count: int) -> float:
            async with pool.acquire() as conn:
                async with conn.transaction():
                    await offer(conn, first, count)
                return monotonic()

        return await _produce(spec, publish_tx)
    finally:
        await pool.close()


async def _produce(spec: dict[str, Any], publish_tx: Callable[[int, int], Awaitable[float]]) -> ProducerRun:
    rate = spec["rate"]
    return await steady_producer(publish_tx, rate, spec["duration"], spec["connections"], events_per_tx(rate))


PRODUCERS = {"eventbus": _eventbus, "raw_notify": _raw_notify, "pgqueuer": _pgqueuer}


async def _main(spec: dict[str, Any]) -> None:
    with anyio.fail_after(spec["duration"] + 60):  # never outlive a parent that went away
        run = await PRODUCERS[spec["kind"]](spec)
    sys.stdout.write(json.dumps(run.to_json()) + "\n")
    sys.stdout.flush()


def main() -> None:
    """The spec on stdin: ``{"kind": "eventbus" | "raw_notify" | "pgqueuer", "dsn", "rate", "duration", "connections"}``
    plus ``"schema"`` (eventbus, pgqueuer) and ``"channel"`` (raw_notify, pgqueuer)."""
    anyio.run(_main, json.loads(sys.stdin.read()))


if __name__ == "__main__":
    main()
