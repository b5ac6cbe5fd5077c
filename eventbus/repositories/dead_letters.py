"""The ``eventbus_dead_letters`` table, shared by every subscriber: list, get, count, replay and purge letters.

Letters are written by the outbox's settle statement, in the same statement that settles their row.
"""

from __future__ import annotations

import builtins
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import msgspec

from .. import _pool as pooled
from ..events import Envelope
from ..ids import max_id_for, min_id_for, new_id
from ..observability.tracing import trace_id_of
from ._rows import Reason, cap_error, headers_decoder, json_encoder
from .outbox import NewEvent, OutboxRepository

__all__ = ["DeadLetter", "DeadLetterFilter", "DeadLetterRepository", "Reason", "Replayed"]


@dataclass(slots=True)
class Replayed:
    """What a replay did (or would do): how many letters, by reason and subscriber. The letters themselves are
    not kept (a replay streams them page by page); ``on_page`` sees each page."""

    count: int = 0
    #: Letters by (reason, subscriber); the subscriber is None for a letter of every subscriber of its topic.
    by_target: Counter[tuple[str, str | None]] = field(default_factory=Counter)

    def __len__(self) -> int:
        return self.count


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One subscriber's failed delivery of an event (``subscriber`` is None when no subscriber took it)."""

    id: uuid.UUID
    reason: str
    event_id: uuid.UUID
    outbox_id: uuid.UUID | None
    tenant: str
    topic: str
    key: str | None
    subscriber: str | None
    payload: str
    headers: dict[str, str]
    attempts: int
    error_type: str | None
    error: str | None
    failed_at: datetime
    #: The formatted traceback of the last failed attempt (capped, redacted), when it raised.
    traceback: str | None = None
    #: The trace the delivery ran in (the producer's when the consumer recorded no span): find it in your tracing.
    trace_id: str | None = None
    replayed_at: datetime | None
    replay_count: int


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters to list, count, replay or purge. Every field narrows; None means any."""

    reason: str | None = None
    subscriber: str | None = None
    topic: str | None = None
    tenant: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    include_replayed: bool = False

    def __post_init__(self) -> None:
        if self.reason is not None and self.reason not in {r.value for r in Reason}:
            known = ", ".join(r.value for r in Reason)
            raise ValueError(f"unknown reason {self.reason!r}; use one of {known}")

    def params(self) -> tuple[Any, ...]:
        since = min_id_for(self.since) if self.since else None
        until = max_id_for(self.until) if self.until else None
        return (self.reason, self.subscriber, self.topic, self.tenant, since, until, self.include_replayed)


def _dead_letter_from_row(row: asyncpg.Record) -> DeadLetter:
    values = dict(row.items())
    values.pop("picked_at", None)
    values["headers"] = headers_decoder.decode(values["headers"])
    return DeadLetter(**values)


def _replay_event(letter: DeadLetter) -> NewEvent:
    return NewEvent(
        topic=letter.topic,
        payload=letter.payload.encode(),
        key=letter.key,
        target=letter.subscriber,
        tenant=letter.tenant,
        headers={**letter.headers, "eventbus-replay-of": str(letter.id)},
        event_id=letter.event_id,
    )


class DeadLetterRepository:
    """The shared dead-letter table; replays are offered to ``outbox`` (its pool, schema and wake-ups)."""

    def __init__(self, outbox: OutboxRepository) -> None:
        self.outbox = outbox
        self.pool = outbox.pool
        self.queries = outbox.queries

    async def list(
        self, where: DeadLetterFilter | None = None, *, limit: int = 100, before: uuid.UUID | None = None
    ) -> list[DeadLetter]:
        """One page of dead letters, newest first; pass the last id of a page as ``before`` for the next."""
        params = (where or DeadLetterFilter()).params()
        rows = await pooled.fetch(self.pool, self.queries.dead_letter_list, *params, before, limit)
        return [_dead_letter_from_row(row) for row in rows]

    async def add(
        self,
        envelope: Envelope,
        reason: Reason,
        subscriber: str | None,
        *,
        attempts: int,
        error_type: str | None = None,
        error: str | None = None,
        traceback: str | None = None,
        trace_id: str | None = None,
    ) -> uuid.UUID:
        """Write the dead letter of a delivery that no outbox claim settles (a broker consumer's: the relay's
        letters are written by the settle statement). Error text is capped and redacted; returns the letter's id."""
        letter_id = new_id()
        await pooled.execute(
            self.pool, self.queries.dead_letter_insert, letter_id, str(reason), envelope.event_id, envelope.id,
            envelope.tenant, envelope.topic, envelope.key, subscriber, envelope.payload.decode(),
            json_encoder.encode(envelope.headers).decode(), attempts, error_type, cap_error(error), traceback,
            trace_id or trace_id_of(envelope.headers),
        )  # fmt: skip
        return letter_id

    async def get(self, dead_letter_id: uuid.UUID) -> DeadLetter | None:
        row = await pooled.fetchrow(self.pool, self.queries.dead_letter_get, dead_letter_id)
        return None if row is None else _dead_letter_from_row(row)

    async def count(self) -> dict[tuple[str, str | None], int]:
        """Unreplayed dead letters by (reason, subscriber)."""
        rows = await pooled.fetch(self.pool, self.queries.dead_letter_counts)
        return {(row["reason"], row["subscriber"]): row["count"] for row in rows}

    async def replay(
        self,
        where: DeadLetterFilter | None = None,
        *,
        ids: Sequence[uuid.UUID] | None = None,
        dry_run: bool = False,
        rate: float | None = None,
        page: int = 500,
        on_page: Callable[[builtins.list[DeadLetter]], None] | None = None,
    ) -> Replayed:
        """Re-offer unreplayed dead letters (by ``ids`` or by filter) as rows targeted at their subscriber.

        Only letters that failed before the replay began are taken, so letters that fail again while it runs
        wait for the next replay. Each page is one transaction: lock letters with ``SKIP LOCKED``, offer the
        rows, mark the letters replayed. So a letter is replayed once however many replays run at once, and
        replaying it again does nothing. ``rate`` caps letters per second; ``dry_run`` says what would be
        replayed and writes nothing. Returns how many letters were replayed (or would be), by reason and
        subscriber; ``on_page`` is called with each page of letters, so memory stays bounded by a page.
        """
        if where is not None and where.include_replayed:
            raise ValueError("replay takes only unreplayed dead letters; drop include_replayed from the filter")
        params = (where or DeadLetterFilter()).params()[:6]
        id_list = None if ids is None else list(ids)
        if rate is not None:
            if rate <= 0:
                raise ValueError(f"rate must be positive (letters per second), not {rate}")
            page = max(1, min(page, int(rate)))
        done = Replayed()
        cursor: uuid.UUID | None = None
        started_at: datetime | None = None  # letters failing after the replay began are not part of it
        started = anyio.current_time()
        while True:
            async with self.pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                try:
                    rows = await conn.fetch(
                        self.queries.dead_letter_pick, *params, id_list, cursor, page, started_at
                    )
                    if rows and started_at is None:
                        started_at = rows[0]["picked_at"]
                    letters = [_dead_letter_from_row(row) for row in rows]
                    if letters and not dry_run:
                        await self.outbox.offer(conn, [_replay_event(letter) for letter in letters])
                        await conn.execute(self.queries.dead_letter_mark_replayed, [d.id for d in letters])
                except BaseException:
                    await tx.rollback()
                    raise
                if dry_run:
                    await tx.rollback()
                else:
                    await tx.commit()
            done.count += len(letters)
            done.by_target.update((letter.reason, letter.subscriber) for letter in letters)
            if letters and on_page is not None:
                on_page(letters)
            if len(letters) < page:
                return done
            cursor = letters[-1].id
            if rate is not None:
                await anyio.sleep(max(0.0, done.count / rate - (anyio.current_time() - started)))

    async def purge(
        self, older_than: timedelta, *, include_unreplayed: bool = False, batch: int = 5000
    ) -> int:
        """Delete dead letters older than ``older_than`` (only replayed ones unless asked); return how many."""
        bound = min_id_for(datetime.now(UTC) - older_than)
        total = 0
        while True:
            status = await pooled.execute(
                self.pool, self.queries.dead_letter_purge, bound, batch, include_unreplayed
            )
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < batch:
                return total
