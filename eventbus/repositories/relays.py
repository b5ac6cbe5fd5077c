"""The ``eventbus_relays`` table and partition ownership: which relays are alive and which partitions they own.

Ownership of a key partition is a session advisory lock in the schema's lock space, taken on the relay's own
session connection and released when that session ends.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from .. import _pool as pooled
from .._typing import Connection
from ..sql import Queries

__all__ = ["RelayRepository"]


class RelayRepository:
    """Heartbeats of relays, and the advisory locks through which they own partitions."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "eventbus") -> None:
        self.pool = pool
        self.queries = Queries(schema)
        self.lock_space = f"eventbus_{schema}"

    async def heartbeat(self, worker: str, hostname: str, pid: int, partitions: Sequence[int]) -> None:
        """Register ``worker`` or refresh its heartbeat, with the partitions it owns."""
        await pooled.execute(self.pool, self.queries.relay_heartbeat, worker, hostname, pid, list(partitions))

    async def forget(self, worker: str, stale_after: float) -> None:
        """Remove ``worker``'s heartbeat row and every row silent for ``stale_after`` seconds."""
        await pooled.execute(self.pool, self.queries.relay_forget, worker, stale_after)

    async def alive(self, within: float) -> list[asyncpg.Record]:
        """Relays that sent a heartbeat within ``within`` seconds."""
        return list(await pooled.fetch(self.pool, self.queries.relay_alive, within))

    async def lock_partition(self, session: Connection, partition: int) -> bool:
        """Take ownership of ``partition`` on ``session`` (an advisory lock held while the session lives)."""
        return bool(await session.fetchval(self.queries.partition_lock, self.lock_space, partition))

    async def unlock_partition(self, session: Connection, partition: int) -> None:
        await session.fetchval(self.queries.partition_unlock, self.lock_space, partition)

    async def busy_partitions(self, partitions: Sequence[int], worker: str) -> set[int]:
        """Those of ``partitions`` with rows still claimed by a worker other than ``worker``."""
        rows = await pooled.fetch(self.pool, self.queries.partition_busy, list(partitions), worker)
        return {row["partition"] for row in rows}
