"""The only code that speaks SQL: the outbox and the dead-letter table.

Every method is one statement (or one bounded batch of statements for purges) built from the named queries in
``sql/queries.sql``. Completions are fenced: a relay can only settle rows it still holds at the attempt it
claimed, so a relay whose lease ran out cannot overwrite a newer claim.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum, StrEnum
from typing import Any

import anyio
import asyncpg
import msgspec

from . import _pool as pooled
from ._typing import Connection
from ._waker import Waker
from .events import Envelope, partition_of
from .ids import max_id_for, min_id_for, new_id
from .sql import Queries

__all__ = [
    "MAX_ERROR_CHARS",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterRepository",
    "InboxRepository",
    "NewEvent",
    "OfferResult",
    "OutboxRepository",
    "Reason",
    "Settlement",
    "Status",
]

#: Stored error text is cut to this many characters (tracebacks can be long and can carry secrets).
MAX_ERROR_CHARS = 4096

_json = msgspec.json.Encoder()
_headers_decoder = msgspec.json.Decoder(dict[str, str])


class Status(IntEnum):
    PENDING = 0
    IN_FLIGHT = 1
    PUBLISHED = 2
    DEAD = 3


class Reason(StrEnum):
    """Why a delivery ended in the dead-letter table."""

    DELIVERY_FAILED = "DeliveryFailed"
    DESERIALIZATION_FAILED = "DeserializationFailed"
    DUPLICATE_EVENT = "DuplicateEvent"
    HANDLER_MISSING = "HandlerMissing"
    HANDLER_TIMEOUT = "HandlerTimeout"


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An encoded event ready to be offered to the outbox."""

    topic: str
    payload: bytes
    key: str | None = None
    target: str | None = None
    tenant: str = ""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    delay: float = 0.0
    idempotency_key: str | None = None
    event_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class OfferResult:
    """What an offer inserted: one id per offered event, ``None`` where its idempotency key already existed."""

    ids: tuple[uuid.UUID | None, ...]

    @property
    def inserted(self) -> tuple[uuid.UUID, ...]:
        return tuple(i for i in self.ids if i is not None)

    @property
    def duplicates(self) -> int:
        return sum(1 for i in self.ids if i is None)


@dataclass(slots=True)
class Settlement:
    """The outcome of a claimed batch, written back in one statement by :meth:`OutboxRepository.complete`."""

    ids: list[uuid.UUID] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    retry_sources: list[uuid.UUID] = field(default_factory=list)
    retry_ids: list[uuid.UUID] = field(default_factory=list)
    retry_targets: list[str] = field(default_factory=list)
    retry_attempts: list[int] = field(default_factory=list)
    retry_delays: list[float] = field(default_factory=list)
    retry_errors: list[str | None] = field(default_factory=list)
    dead_sources: list[uuid.UUID] = field(default_factory=list)
    dead_ids: list[uuid.UUID] = field(default_factory=list)
    dead_reasons: list[str] = field(default_factory=list)
    dead_subscribers: list[str | None] = field(default_factory=list)
    dead_attempts: list[int] = field(default_factory=list)
    dead_error_types: list[str | None] = field(default_factory=list)
    dead_errors: list[str | None] = field(default_factory=list)

    def settle(self, row: Envelope, status: Status, *, delay: float = 0.0, error: str | None = None) -> None:
        """Give a claimed row its final status (or, with PENDING, send it back after ``delay`` seconds)."""
        self.ids.append(row.id)
        self.attempts.append(row.attempts)
        self.statuses.append(int(status))
        self.delays.append(delay)
        self.errors.append(error)

    def retry(self, row: Envelope, subscriber: str, *, delay: float, error: str | None) -> None:
        """Cut a row targeted at ``subscriber`` alone from a claimed row, due after ``delay`` seconds."""
        self.retry_sources.append(row.id)
        self.retry_ids.append(new_id())
        self.retry_targets.append(subscriber)
        self.retry_attempts.append(row.attempts)
        self.retry_delays.append(delay)
        self.retry_errors.append(error)

    def dead_letter(
        self,
        row: Envelope,
        reason: Reason,
        subscriber: str | None,
        *,
        error_type: str | None = None,
        error: str | None = None,
        attempts: int | None = None,
    ) -> None:
        """Record a dead letter for ``subscriber``'s delivery of a claimed row."""
        self.dead_sources.append(row.id)
        self.dead_ids.append(new_id())
        self.dead_reasons.append(str(reason))
        self.dead_subscribers.append(subscriber)
        self.dead_attempts.append(row.attempts if attempts is None else attempts)
        self.dead_error_types.append(error_type)
        self.dead_errors.append(error)

    def __len__(self) -> int:
        return len(self.ids)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    source: str
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


def cap_error(text: str | None, redact: Callable[[str], str] | None = None) -> str | None:
    """Redact (when a hook is set) and cut error text to :data:`MAX_ERROR_CHARS`."""
    if text is None:
        return None
    if redact is not None:
        text = redact(text)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 20] + " … [truncated]"
    return text


def envelope_from_row(row: asyncpg.Record) -> Envelope:
    return Envelope(
        id=row["id"],
        event_id=row["event_id"],
        topic=row["topic"],
        payload=row["payload"].encode(),
        key=row["key"],
        target=row["target"],
        tenant=row["tenant"],
        headers=_headers_decoder.decode(row["headers"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
    )


def _dead_letter_from_row(row: asyncpg.Record) -> DeadLetter:
    values = dict(row.items())
    values.pop("picked_at", None)
    values["headers"] = _headers_decoder.decode(values["headers"])
    return DeadLetter(**values)


class OutboxRepository:
    """Offers, claims, settles, reclaims and purges outbox rows."""

    def __init__(
        self, pool: asyncpg.Pool, schema: str = "eventbus", *, notify: bool = True, wake_spacing: float = 0.002
    ) -> None:
        self.pool = pool
        self.queries = Queries(schema)
        self.channel = f"eventbus_{schema}"
        self.notify = notify
        #: Coalesces the wake-ups of bus transactions; a started bus runs it (see :mod:`eventbus._waker`).
        self.waker = Waker(self.channel, self.queries.wake, spacing=wake_spacing)

    async def offer(self, connection: Connection, events: Sequence[NewEvent]) -> OfferResult:
        """Insert ``events`` in the caller's transaction, in one round trip.

        A repeated ``idempotency_key`` (per tenant) inserts nothing; its slot in the result is ``None``.
        Relays are woken when the transaction commits, and only for events that are due now.
        """
        if not events:
            return OfferResult(())
        folded = pooled.bus_connection(connection) if self.notify else None
        if folded is not None and folded.in_bus_transaction:
            # In a bus transaction the wake-up is sent after the COMMIT, outside the user's transaction.
            result = await self._insert(connection, events, None)
            if any(i is not None and e.delay <= 0 for e, i in zip(events, result.ids, strict=True)):
                folded.wake_after_commit(self.waker)
            return result
        return await self._insert(connection, events, self.channel if self.notify else None)

    async def _insert(self, connection: Connection, events: Sequence[NewEvent], channel: str | None) -> OfferResult:
        if len(events) == 1:
            e = events[0]
            row_id = new_id()
            args = (
                row_id, e.event_id or row_id, e.tenant, e.topic, e.key, partition_of(e.key), e.target,
                e.payload.decode(), _json.encode(e.headers).decode(), e.delay, e.idempotency_key,
            )  # fmt: skip
            if channel is not None:
                return OfferResult((await connection.fetchval(self.queries.offer_one_waking, *args, channel),))
            status = await connection.execute(self.queries.offer_one, *args)
            return OfferResult((row_id if status.endswith(" 1") else None,))
        ids = [new_id() for _ in events]
        rows = await connection.fetch(
            self.queries.offer,
            ids,
            [e.event_id or i for e, i in zip(events, ids, strict=True)],
            [e.tenant for e in events],
            [e.topic for e in events],
            [e.key for e in events],
            [partition_of(e.key) for e in events],
            [e.target for e in events],
            [e.payload.decode() for e in events],
            [_json.encode(e.headers).decode() for e in events],
            [e.delay for e in events],
            [e.idempotency_key for e in events],
            channel,
        )
        if len(rows) == len(ids):
            return OfferResult(tuple(ids))
        inserted = {row["id"] for row in rows}
        return OfferResult(tuple(i if i in inserted else None for i in ids))

    async def take_pending(
        self, limit: int, lease: float, worker: str, *, partitions: Sequence[int] | None = None
    ) -> list[Envelope]:
        """Claim up to ``limit`` due rows for ``lease`` seconds, oldest id first, skipping rows others hold.

        With ``partitions``, keyed rows are claimed only from those partitions (rows without a key always).
        """
        rows = await pooled.fetch(
            self.pool, self.queries.claim, limit, worker, lease, None if partitions is None else list(partitions)
        )
        claimed = [envelope_from_row(row) for row in rows]
        claimed.sort(key=lambda e: e.id)
        return claimed

    async def complete(self, worker: str, settlement: Settlement) -> int:
        """Write a batch's outcomes in one statement; return how many claimed rows were still ours to settle."""
        if not settlement.ids:
            return 0
        s = settlement
        with anyio.CancelScope(shield=True):
            row = await pooled.fetchrow(
                self.pool, self.queries.complete,
                worker,
                s.ids, s.attempts, s.statuses, s.delays, s.errors,
                s.retry_sources, s.retry_ids, s.retry_targets, s.retry_attempts, s.retry_delays, s.retry_errors,
                s.dead_sources, s.dead_ids, s.dead_reasons, s.dead_subscribers, s.dead_attempts,
                s.dead_error_types, s.dead_errors,
            )  # fmt: skip
        assert row is not None
        return int(row["settled"])

    async def mark_published(self, worker: str, rows: Sequence[Envelope]) -> int:
        """Mark claimed rows published (fenced by worker and attempt); return how many were."""
        settlement = Settlement()
        for row in rows:
            settlement.settle(row, Status.PUBLISHED)
        return await self.complete(worker, settlement)

    async def mark_failed(
        self,
        worker: str,
        row: Envelope,
        *,
        error: str,
        retry_in: float | None = None,
        reason: Reason = Reason.DELIVERY_FAILED,
        subscriber: str | None = None,
        error_type: str | None = None,
    ) -> int:
        """Send a claimed row back to pending after ``retry_in`` seconds, or, without it, dead-letter it."""
        settlement = Settlement()
        if retry_in is not None:
            settlement.settle(row, Status.PENDING, delay=retry_in, error=cap_error(error))
        else:
            settlement.settle(row, Status.DEAD, error=cap_error(error))
            settlement.dead_letter(
                row, reason, subscriber or row.target, error_type=error_type, error=cap_error(error)
            )
        return await self.complete(worker, settlement)

    async def renew(self, worker: str, ids: Sequence[uuid.UUID], lease: float) -> None:
        """Extend the lease on rows ``worker`` still holds."""
        with anyio.CancelScope(shield=True):
            await pooled.execute(self.pool, self.queries.renew, worker, list(ids), lease)

    async def reclaim_expired(self, batch: int = 1000) -> int:
        """Return rows whose lease ran out to pending; return how many."""
        total = 0
        while True:
            rows = await pooled.fetch(self.pool, self.queries.reclaim, batch)
            total += len(rows)
            if len(rows) < batch:
                return total

    async def purge(
        self,
        older_than: timedelta,
        *,
        batch: int = 5000,
        pause: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Delete published rows older than ``older_than`` in batches of ``batch`` (short transactions that
        never block claims), pausing ``pause`` seconds between them; return how many."""
        bound = min_id_for(datetime.now(UTC) - older_than)
        total = 0
        while True:
            status = await pooled.execute(self.pool, self.queries.purge_outbox, bound, batch)
            deleted = int(status.split()[-1])
            total += deleted
            if on_batch is not None:
                on_batch(deleted)
            if deleted < batch:
                return total
            if pause:
                await anyio.sleep(pause)

    async def get(self, row_id: uuid.UUID) -> asyncpg.Record | None:
        return await pooled.fetchrow(self.pool, self.queries.outbox_get, row_id)

    async def counts(self) -> asyncpg.Record:
        row = await pooled.fetchrow(self.pool, self.queries.outbox_counts)
        assert row is not None
        return row

    async def refresh_statistics(self) -> bool:
        """ANALYZE the outbox when it has outgrown its planner statistics; return whether it did.

        Autovacuum analyzes a table at most once a minute, and only after a tenth of its rows changed. Until then
        the plans each connection cached while the table was small stay: settling ten rows by a sequential scan
        of the whole outbox (measured: p50 1.5 ms growing to 5.6 ms, slowest 23 ms, within 40 s of a new
        table at 1,000 events/s). The check is one catalog lookup; the ANALYZE runs at each doubling of the table.
        """
        if not await pooled.fetchval(self.pool, self.queries.outbox_outgrown):
            return False
        await pooled.execute(self.pool, self.queries.outbox_analyze)
        return True

    async def unsettled(self) -> int:
        """Rows still pending (due or delayed) or in flight."""
        return int(await pooled.fetchval(self.pool, self.queries.outbox_unsettled))

    async def busy_partitions(self, partitions: Sequence[int], worker: str) -> set[int]:
        """Those of ``partitions`` with rows still leased to a worker other than ``worker``."""
        rows = await pooled.fetch(self.pool, self.queries.partitions_busy, list(partitions), worker)
        return {row["partition"] for row in rows}

    async def lock_partition(self, session: Connection, partition: int) -> bool:
        """Take ownership of ``partition`` on ``session`` (an advisory lock held while the session lives)."""
        return bool(await session.fetchval(self.queries.partition_lock, self.channel, partition))

    async def unlock_partition(self, session: Connection, partition: int) -> None:
        await session.fetchval(self.queries.partition_unlock, self.channel, partition)

    async def heartbeat(self, worker: str, hostname: str, pid: int, partitions: Sequence[int]) -> None:
        await pooled.execute(self.pool, self.queries.relay_beat, worker, hostname, pid, list(partitions))

    async def forget_relay(self, worker: str, stale_after: float) -> None:
        """Remove ``worker``'s heartbeat row and every row silent for ``stale_after`` seconds."""
        await pooled.execute(self.pool, self.queries.relay_forget, worker, stale_after)

    async def relays_alive(self, within: float) -> list[asyncpg.Record]:
        return list(await pooled.fetch(self.pool, self.queries.relays_alive, within))


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
    """The shared dead-letter table: add, list, get, count, replay, purge."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "eventbus") -> None:
        self.pool = pool
        self.queries = Queries(schema)
        self._outbox = OutboxRepository(pool, schema)

    async def add(
        self,
        *,
        reason: Reason,
        event_id: uuid.UUID,
        topic: str,
        payload: bytes,
        subscriber: str | None = None,
        key: str | None = None,
        tenant: str = "",
        headers: dict[str, str] | None = None,
        attempts: int = 0,
        error_type: str | None = None,
        error: str | None = None,
        source: str = "event",
    ) -> uuid.UUID:
        dead_id = new_id()
        await pooled.execute(
            self.pool, self.queries.dead_letter_add,
            dead_id, source, str(reason), event_id, tenant, topic, key, subscriber, payload.decode(),
            _json.encode(headers or {}).decode(), attempts, error_type, cap_error(error),
        )  # fmt: skip
        return dead_id

    async def list(
        self, where: DeadLetterFilter | None = None, *, limit: int = 100, before: uuid.UUID | None = None
    ) -> list[DeadLetter]:
        """One page of dead letters, newest first; pass the last id of a page as ``before`` for the next."""
        params = (where or DeadLetterFilter()).params()
        rows = await pooled.fetch(self.pool, self.queries.dead_letter_list, *params, before, limit)
        return [_dead_letter_from_row(row) for row in rows]

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
        on_page: Callable[[int], None] | None = None,
    ) -> builtins.list[DeadLetter]:
        """Re-offer unreplayed dead letters (by ``ids`` or by filter) as rows targeted at their subscriber.

        Only letters that failed before the replay began are taken, so letters that fail again while it runs
        wait for the next replay. Each page is one transaction: lock letters with ``SKIP LOCKED``, offer the
        rows, mark the letters replayed. So a letter is replayed once however many replays run at once, and
        replaying it again does nothing. ``rate`` caps letters per second; ``dry_run`` returns what would be
        replayed and writes nothing. Returns the letters replayed (or that would be).
        """
        if where is not None and where.include_replayed:
            raise ValueError("replay takes only unreplayed dead letters; drop include_replayed from the filter")
        params = (where or DeadLetterFilter()).params()[:6]
        id_list = None if ids is None else list(ids)
        if rate is not None:
            if rate <= 0:
                raise ValueError(f"rate must be positive (letters per second), not {rate}")
            page = max(1, min(page, int(rate)))
        done: builtins.list[DeadLetter] = []
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
                        await self._outbox.offer(conn, [_replay_event(letter) for letter in letters])
                        await conn.execute(self.queries.dead_letter_mark_replayed, [d.id for d in letters])
                except BaseException:
                    await tx.rollback()
                    raise
                if dry_run:
                    await tx.rollback()
                else:
                    await tx.commit()
            done.extend(letters)
            if letters and on_page is not None:
                on_page(len(letters))
            if len(letters) < page:
                return done
            cursor = letters[-1].id
            if rate is not None:
                await anyio.sleep(max(0.0, len(done) / rate - (anyio.current_time() - started)))

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


class InboxRepository:
    """Consumer-side dedupe: one row per (subscriber, event_id), written in the handler's own transaction."""

    def __init__(self, schema: str = "eventbus") -> None:
        self.queries = Queries(schema)

    async def enter(
        self, connection: Connection, subscriber: str, event_id: uuid.UUID, payload_hash: bytes
    ) -> tuple[bool, bytes | None]:
        """Record a first delivery; return (True, None), or (False, hash recorded by the earlier delivery).

        The hash is None when a concurrent delivery of the same event committed while this one waited.
        """
        row = await connection.fetchrow(self.queries.inbox_enter, subscriber, event_id, payload_hash)
        if row is None:
            return False, None
        return bool(row["inserted"]), row["existing_hash"]
