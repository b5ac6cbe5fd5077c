"""The ``eventbus_inbox`` table: one row per (subscriber, event_id), the transactional subscriber's dedupe."""

from __future__ import annotations

import uuid
from datetime import timedelta

import anyio
import asyncpg

from .. import _pool as pooled
from .._typing import Connection
from ..sql import Queries

__all__ = ["InboxRepository"]


class InboxRepository:
    """Consumer-side dedupe, written in the handler's own transaction."""

    def __init__(self, schema: str = "eventbus") -> None:
        self.queries = Queries(schema)

    async def enter(
        self, connection: Connection, subscriber: str, event_id: uuid.UUID, payload_hash: bytes, tenant: str = ""
    ) -> tuple[bool, bytes | None]:
        """Record a first delivery of the event (of ``tenant``); return (True, None), or (False, hash recorded by
        the earlier delivery).

        The hash is None when a concurrent delivery of the same event committed while this one waited.
        """
        row = await connection.fetchrow(self.queries.inbox_enter, subscriber, event_id, payload_hash, tenant)
        if row is None:
            return False, None
        return bool(row["inserted"]), row["existing_hash"]

    async def purge(self, pool: asyncpg.Pool, older_than: timedelta, *, batch: int = 5000, pause: float = 0.0) -> int:
        """Delete inbox rows processed longer than ``older_than`` ago, in batches, except those of events with a
        dead letter not yet replayed; return how many."""
        total = 0
        while True:
            status = await pooled.execute(pool, self.queries.inbox_purge, older_than.total_seconds(), batch)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < batch:
                return total
            if pause:
                await anyio.sleep(pause)

    async def seen(self, connection: Connection, subscriber: str, event_id: uuid.UUID) -> bool:
        """Whether ``subscriber`` recorded ``event_id`` as processed (its effect committed)."""
        return bool(await connection.fetchval(self.queries.inbox_seen, subscriber, event_id))
