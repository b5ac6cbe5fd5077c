"""The ``eventbus_relays`` and ``eventbus_partitions`` tables: which relays are alive, and which of them owns each
key partition.

A relay owns a partition while its lease runs; taking a partition over bumps its epoch. The outbox's claim and
settle statements check owner and epoch themselves (see ``queries.sql``), so ownership is fenced in the database:
a relay whose lease ran out, or whose session or network is gone, can neither claim nor settle keyed rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence

import asyncpg

from .. import _pool as pooled
from .._typing import Connection
from ..observability.metrics import Gauges
from ..sql import Queries
from .subscriptions import Carried, carried_document

__all__ = ["RelayRepository"]


class RelayRepository:
    """Heartbeats of relays, and leases on the key partitions."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "eventbus") -> None:
        self.pool = pool
        self.queries = Queries(schema)
        self.lock_space = f"eventbus_{schema}"

    async def heartbeat(
        self, worker: str, hostname: str, pid: int, partitions: Sequence[int], carried: Sequence[Carried] = (),
        *, live_within: float = 6.0, unreachable_for: float | None = None,
    ) -> dict[str, str]:
        """Register ``worker`` or refresh its heartbeat, with the partitions it owns, the subscribers it carries
        (whose registered topics become those of every relay live within ``live_within`` seconds that carries
        them) and how long its broker has not answered (None: it answers); return those of its subscribers that
        are ``paused`` or ``unregistered``, with that state."""
        rows = await pooled.fetch(
            self.pool, self.queries.relay_heartbeat, worker, hostname, pid, list(partitions),
            carried_document(carried), live_within, unreachable_for,
        )  # fmt: skip
        return {row["name"]: row["state"] for row in rows}

    async def forget(self, worker: str, stale_after: float) -> None:
        """Remove ``worker``'s heartbeat row and every row silent for ``stale_after`` seconds."""
        await pooled.execute(self.pool, self.queries.relay_forget, worker, stale_after)

    async def alive(self, within: float) -> list[asyncpg.Record]:
        """Relays that sent a heartbeat within ``within`` seconds."""
        return list(await pooled.fetch(self.pool, self.queries.relay_alive, within))

    async def acquire(
        self, worker: str, partitions: Sequence[int], lease: float, *, held: Collection[uuid.UUID] | None = None
    ) -> dict[int, int]:
        """Take those of ``partitions`` that are free (or whose owner's lease ran out); return them with their
        new epochs. Rows ``worker`` still holds in a partition it takes back are adopted at the new epoch (only
        those in ``held``, when given: the rows it still has in hand)."""
        rows = await pooled.fetch(
            self.pool, self.queries.partition_acquire, worker, list(partitions), lease,
            None if held is None else list(held),
        )  # fmt: skip
        return {row["partition"]: row["epoch"] for row in rows}

    async def renew(self, worker: str, partitions: Sequence[int], lease: float) -> dict[int, int]:
        """Extend ``worker``'s leases; return the partitions it still owns (a lease that ran out is lost)."""
        rows = await pooled.fetch(self.pool, self.queries.partition_renew, worker, list(partitions), lease)
        return {row["partition"]: row["epoch"] for row in rows}

    async def release(self, worker: str, partitions: Iterable[int]) -> None:
        """Give those of ``partitions`` that ``worker`` owns up (after their rows were settled or handed back)."""
        await pooled.execute(self.pool, self.queries.partition_release, worker, list(partitions))

    async def owners(self) -> list[asyncpg.Record]:
        """Every partition with its ``owner``, ``epoch``, ``lease_until`` and whether the lease is ``live``."""
        return list(await pooled.fetch(self.pool, self.queries.partition_owners))

    async def busy_partitions(self, partitions: Sequence[int], worker: str) -> set[int]:
        """Those of ``partitions`` with rows still claimed by a worker other than ``worker``."""
        rows = await pooled.fetch(self.pool, self.queries.partition_busy, list(partitions), worker)
        return {row["partition"] for row in rows}

    async def lead_retention(self, session: Connection) -> bool:
        """Become the one relay of the schema that runs retention (an advisory lock held while ``session`` lives)."""
        return bool(await session.fetchval(self.queries.retention_lock, self.lock_space))

    async def lead_metrics(self, session: Connection) -> bool:
        """Become the one relay of the schema that reads its gauges (an advisory lock held while ``session``
        lives)."""
        return bool(await session.fetchval(self.queries.metrics_lock, self.lock_space))

    async def gauges(self) -> Gauges:
        """The schema's gauges (pending, in flight, lag, per subscriber, unreplayed dead letters), in one
        statement."""
        row = await pooled.fetchrow(self.pool, self.queries.metrics_gauges)
        assert row is not None
        return Gauges(
            pending=row["pending"], in_flight=row["in_flight"], lag=row["lag"],
            subscribers={
                name: (pending, lag) for name, pending, lag in
                zip(row["subscribers"], row["subscriber_pending"], row["subscriber_lag"], strict=True)
            },
            dead_letters={
                (reason, subscriber): n for reason, subscriber, n in
                zip(row["letter_reasons"], row["letter_subscribers"], row["letter_counts"], strict=True)
            },
        )  # fmt: skip
