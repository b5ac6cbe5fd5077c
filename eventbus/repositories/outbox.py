"""The ``eventbus_outbox`` table: offer, claim, settle, renew, reclaim and purge its rows.

Every method is one statement (or one bounded batch of statements for purges) built from the named queries in
``sql/queries.sql``. Settling is fenced: a relay can only settle rows it still holds at the attempt it claimed,
so a relay whose lease ran out cannot overwrite a newer claim.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any

import anyio
import asyncpg
import msgspec

from .. import _pool as pooled
from .._typing import Connection
from .._waker import Waker
from ..events import Envelope, EventFields, partition_of
from ..ids import min_id_for, new_id
from ..observability import logs
from ..observability.metrics import Metrics
from ..observability.tracing import trace_id_of
from ..sql import Queries, quote_schema
from ._rows import Reason, cap_error, headers_decoder, json_encoder
from .subscriptions import Carried, pairs

__all__ = ["NewEvent", "OfferResult", "OutboxRepository", "Settlement", "Status", "envelope_from_row"]

log = logging.getLogger("eventbus.outbox")


class Status(IntEnum):
    """Where an outbox row stands."""

    #: Waiting to be claimed (from ``available_at`` on).
    PENDING = 0
    #: Leased to one relay until ``claimed_until``.
    CLAIMED = 1
    #: The relay is done with it: every subscriber's share was handled, or handed on as a targeted row or a
    #: dead letter (with a broker transport: the broker acknowledged it).
    RELAYED = 2
    #: Every subscriber's share ended in the dead-letter table.
    DEAD = 3


class NewEvent(EventFields, frozen=True, kw_only=True):
    """An encoded event ready to be offered to the outbox (see :meth:`EventBus.encode`); ``event_id`` is set
    only to give a row the place of an event offered before (a retry or a replay keeps it)."""

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


_Mark = tuple[uuid.UUID, int, int, float, str | None]
_Retry = tuple[uuid.UUID, uuid.UUID, str, int, float, str | None, bool]
_DeadLetter = tuple[uuid.UUID, uuid.UUID, str, str | None, int, str | None, str | None, str | None, str | None]


@dataclass(slots=True)
class Settlement:
    """Outcomes of claimed rows, written in one statement by :meth:`OutboxRepository.settle`. Error text is cut
    to :data:`~eventbus.repositories.MAX_ERROR_CHARS`."""

    #: (row id, attempt, status, delay, error) per claimed row.
    marks: list[_Mark] = field(default_factory=list)
    #: (claimed row id, new row id, subscriber, attempt, delay, error, leased) per targeted row cut from a
    #: claimed row: a retry, or a continuation that carries one subscriber's share on.
    retries: list[_Retry] = field(default_factory=list)
    #: (claimed row id, letter id, reason, subscriber, attempts, error type, error, traceback, trace id) per dead
    #: letter.
    dead_letters: list[_DeadLetter] = field(default_factory=list)
    #: Rows sent back to pending that get the claim's attempt back (they never ran).
    refunds: set[uuid.UUID] = field(default_factory=set)
    #: Dead letters to log once the settle statement wrote them (by letter id): those it may leave out, a
    #: ``HandlerMissing`` letter of an event that a subscriber elsewhere gets (see :meth:`dead_letter`).
    announce: dict[uuid.UUID, tuple[Envelope, str | None]] = field(default_factory=dict)

    def mark(
        self, row: Envelope, status: Status, *, delay: float = 0.0, error: str | None = None, refund: bool = False
    ) -> None:
        """Give a claimed row its final status (or, with PENDING, send it back after ``delay`` seconds; with
        ``refund``, giving back the attempt its claim counted, for a row that never ran)."""
        self.marks.append((row.id, row.attempts, int(status), delay, cap_error(error)))
        if refund:
            self.refunds.add(row.id)

    def retry(self, row: Envelope, subscriber: str, *, delay: float, error: str | None) -> uuid.UUID:
        """Cut a row targeted at ``subscriber`` alone from a claimed row, due after ``delay`` seconds; return
        the new row's id."""
        row_id = new_id()
        self.retries.append((row.id, row_id, subscriber, row.attempts, delay, cap_error(error), False))
        return row_id

    def continuation(self, row: Envelope, subscriber: str, *, leased: bool) -> Envelope:
        """Cut a row that carries ``subscriber``'s share of a claimed row on, with the same event id, so the
        claimed row can settle for its other subscribers. ``leased``: the share is being handled here, and the
        new row is claimed by the settling worker at the same attempt (its outcome settles the new row); else
        the new row is pending and its share gets back the attempt it never ran. Returns the new row."""
        row_id = new_id()
        attempts = row.attempts if leased else max(0, row.attempts - 1)
        self.retries.append((row.id, row_id, subscriber, attempts, 0.0, None, leased))
        return msgspec.structs.replace(row, id=row_id, target=subscriber, attempts=attempts)

    def dead_letter(
        self,
        row: Envelope,
        reason: Reason,
        subscriber: str | None,
        *,
        error_type: str | None = None,
        error: str | None = None,
        attempts: int | None = None,
        traceback: str | None = None,
        trace_id: str | None = None,
        log_when_written: bool = False,
    ) -> uuid.UUID:
        """Record a dead letter for ``subscriber``'s delivery of a claimed row; return the letter's id.
        ``traceback`` is stored as given (see :func:`eventbus.observability.logs.format_traceback`). With
        ``log_when_written``, :meth:`OutboxRepository.settle` logs the letter if its statement wrote it (the caller
        logs the others when it decides them)."""
        letter_id = new_id()
        tried = row.attempts if attempts is None else attempts
        trace_id = trace_id or trace_id_of(row.headers)
        text = cap_error(error)
        self.dead_letters.append(
            (row.id, letter_id, str(reason), subscriber, tried, error_type, text, traceback, trace_id)
        )
        if log_when_written:
            self.announce[letter_id] = (row, error_type)
        return letter_id

    def columns(self) -> list[list[Any]]:
        """The settle statement's array parameters: the marks', retries' and dead letters' fields, one array per
        field (the letters' tracebacks and trace ids last: they are its parameters 25 and 26)."""
        return [*_columns(self.marks, 5), *_columns(self.retries, 7), *_columns(self.dead_letters, 9)]

    def extend(self, other: Settlement) -> None:
        """Take on ``other``'s outcomes (to write several in one statement)."""
        self.marks.extend(other.marks)
        self.retries.extend(other.retries)
        self.dead_letters.extend(other.dead_letters)
        self.refunds |= other.refunds
        self.announce |= other.announce

    def leased(self) -> set[uuid.UUID]:
        """The ids of the rows this settlement inserts as claimed (continuations being handled)."""
        return {retry[1] for retry in self.retries if retry[6]}

    def __len__(self) -> int:
        return len(self.marks)


_letters_decoder = msgspec.json.Decoder(list[tuple[uuid.UUID, str, str | None, str]])


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


class Claimed(list[Envelope]):
    """Claimed rows, in event id order, and which of the claiming relay's subscribers were paused as the claim saw
    them (their shares of these rows are to wait: see ``Transport.hold``)."""

    paused: frozenset[str] = frozenset()
    #: A tenant offered the claim as many rows as its share allowed: it may have more due now.
    more: bool = False


def envelope_from_row(row: asyncpg.Record) -> Envelope:
    return Envelope(
        id=row["id"],
        event_id=row["event_id"],
        topic=row["topic"],
        payload=row["payload"].encode(),
        key=row["key"],
        target=row["target"],
        tenant=row["tenant"],
        headers=headers_decoder.decode(row["headers"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
    )


class OutboxRepository:
    """Offers, claims, settles, renews, reclaims and purges outbox rows."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str = "eventbus",
        *,
        notify: bool = True,
        wake_spacing: float = 0.002,
        metrics: Metrics | None = None,
    ) -> None:
        self.pool = pool
        self.schema = schema
        self.queries = Queries(schema)
        self.metrics = metrics if metrics is not None else Metrics.of()
        self.channel = f"eventbus_{schema}"
        self.notify = notify
        #: Coalesces the wake-ups of bus transactions; a started bus runs it (see :mod:`eventbus._waker`).
        self.waker = Waker(self.channel, self.queries.wake, spacing=wake_spacing)
        self._partitioned = False

    async def offer(self, connection: Connection, events: Sequence[NewEvent]) -> OfferResult:
        """Insert ``events`` in the caller's transaction, in one round trip.

        A repeated ``idempotency_key`` (per tenant) inserts nothing; its slot in the result is ``None``.
        Relays are woken when the transaction commits, and only for events that are due now.
        """
        if not events:
            return OfferResult(())
        folded = pooled.bus_connection(connection)
        in_bus_transaction = folded is not None and folded.in_bus_transaction
        with self.metrics.operation("offer", self.schema):
            if self.notify and in_bus_transaction:
                assert folded is not None
                # In a bus transaction the wake-up is sent after the COMMIT, outside the user's transaction.
                result = await self._insert(connection, events, None)
                if any(i is not None and e.delay <= 0 for e, i in zip(events, result.ids, strict=True)):
                    folded.wake_after_commit(self.waker)
            else:
                result = await self._insert(connection, events, self.channel if self.notify else None)
        sent = [(e.topic, e.tenant) for e, i in zip(events, result.ids, strict=True) if i is not None]
        if in_bus_transaction:
            assert folded is not None
            folded.count_at_commit(self.metrics.sent, sent)  # counted once the bus's COMMIT succeeded
        else:
            counter = self.metrics.sent  # the caller's transaction: counted now, it may still roll back
            for key in sent:
                counter[key] += 1
        return result

    async def _insert(self, connection: Connection, events: Sequence[NewEvent], channel: str | None) -> OfferResult:
        if len(events) == 1:
            e = events[0]
            row_id = new_id()
            args = (
                row_id, e.event_id or row_id, e.tenant, e.topic, e.key, partition_of(e.key), e.target,
                e.payload.decode(), json_encoder.encode(e.headers).decode(), e.delay, e.idempotency_key,
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
            [json_encoder.encode(e.headers).decode() for e in events],
            [e.delay for e in events],
            [e.idempotency_key for e in events],
            channel,
        )
        if len(rows) == len(ids):
            return OfferResult(tuple(ids))
        inserted = {row["id"] for row in rows}
        return OfferResult(tuple(i if i in inserted else None for i in ids))

    async def claim(
        self,
        limit: int,
        lease: float,
        worker: str,
        *,
        partitions: Sequence[int] | None = None,
        skip: Sequence[str] = (),
        skip_topics: Sequence[str] = (),
        carried: Sequence[Carried] | None = None,
    ) -> Claimed:
        """Lease up to ``limit`` due rows to ``worker`` for ``lease`` seconds, oldest event id first, skipping
        rows others hold; the attempt is counted now. Keyed rows come only from partitions ``worker`` owns.

        With ``partitions``, keyed rows are claimed only from those partitions (rows without a key always).
        Rows targeted at a subscriber in ``skip``, and untargeted rows of a topic in ``skip_topics`` (subscribers
        without room), are left for later. With ``carried`` (what ``worker`` delivers), rows targeted at a paused
        subscriber, or at an active one ``worker`` does not carry with the row's topic, are left to others.
        """
        names, topics = pairs(carried) if carried is not None else (None, None)
        with self.metrics.operation("claim", self.schema):
            rows = await pooled.fetch(
                self.pool, self.queries.claim, limit, worker, lease, None if partitions is None else list(partitions),
                list(skip) if skip else None, list(skip_topics) if skip_topics else None, names, topics,
            )  # fmt: skip
        claimed = Claimed()
        if rows:
            claimed.paused = frozenset(rows[0]["paused"] or ())
            claimed.more = bool(rows[0]["more"])
        unreadable = Settlement()
        for row in rows:
            try:
                claimed.append(envelope_from_row(row))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                # A row no relay can read (its headers are not a JSON object of strings): dead-lettered now,
                # on its own, so that it neither fails every claim that meets it nor holds its batch-mates up.
                bare = Envelope(id=row["id"], event_id=row["event_id"], topic=row["topic"], payload=b"",
                                attempts=row["attempts"])  # fmt: skip
                why = f"the row's headers do not decode into a JSON object of strings: {exc}"
                unreadable.mark(bare, Status.DEAD, error=why)
                unreadable.dead_letter(
                    bare, Reason.DESERIALIZATION_FAILED, row["target"], error_type="DeserializationError", error=why
                )
                logs.dead_lettered(bare, row["target"], Reason.DESERIALIZATION_FAILED, "DeserializationError",
                                   cap_error(why), row["attempts"], tenant=row["tenant"])  # fmt: skip
        if unreadable:
            try:
                await self.settle(worker, unreadable, lease=lease)
            except Exception:
                # The readable rows are claimed already and must reach the relay; the unreadable ones come back
                # when their lease ends, to be dead-lettered by the next claim that meets them.
                log.warning("could not dead-letter %d unreadable outbox rows; they come back after their lease",
                            len(unreadable), exc_info=True)  # fmt: skip
        claimed.sort(key=lambda e: (e.event_id, e.id))
        return claimed

    async def settle(
        self, worker: str, settlement: Settlement, *, lease: float = 30.0, carried: Sequence[Carried] | None = None
    ) -> int:
        """Write the outcomes of claimed rows in one statement, shielded from cancellation; return how many
        rows were still ``worker``'s to settle (the rest were reclaimed and belong to a newer claim).
        Continuations it inserts as claimed are leased to ``worker`` for ``lease`` seconds. With ``carried``
        (what ``worker`` delivers), every untargeted row settled gets a targeted row for each registered subscriber
        of its topic that is not retired and not carried (see :mod:`.subscriptions`)."""
        if not settlement.marks:
            return 0
        names, topics = pairs(carried) if carried is not None else (None, None)
        with anyio.CancelScope(shield=True), self.metrics.operation("settle", self.schema):
            refunds = [mark[0] in settlement.refunds for mark in settlement.marks] if settlement.refunds else None
            *columns, tracebacks, trace_ids = settlement.columns()
            row = await pooled.fetchrow(
                self.pool, self.queries.settle, worker, *columns, lease, names, topics, refunds, tracebacks, trace_ids
            )
        assert row is not None
        if row["letters"] is not None:
            written = _letters_decoder.decode(row["letters"])
            self.metrics.dead_letters.update((reason, subscriber, tenant) for _, reason, subscriber, tenant in written)
            if settlement.announce:
                self._announce(settlement, [letter_id for letter_id, *_ in written])
        return int(row["settled"])

    @staticmethod
    def _announce(settlement: Settlement, written: Sequence[uuid.UUID]) -> None:
        letters = {letter[1]: letter for letter in settlement.dead_letters}
        for letter_id in written:
            announced = settlement.announce.get(letter_id)
            if announced is not None:
                row, error_type = announced
                _, _, reason, subscriber, attempts, _, error, _, trace_id = letters[letter_id]
                logs.dead_lettered(row, subscriber, reason, error_type, error, attempts, trace_id=trace_id)

    async def renew(self, worker: str, ids: Sequence[uuid.UUID], lease: float) -> None:
        """Extend the lease on rows ``worker`` still holds."""
        with anyio.CancelScope(shield=True):
            await pooled.execute(self.pool, self.queries.renew, worker, list(ids), lease)

    async def reclaim(self, batch: int = 1000) -> int:
        """Return claimed rows whose lease ran out to pending; return how many."""
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
        """Delete relayed rows older than ``older_than`` in batches of ``batch`` (short transactions that
        never block claims), pausing ``pause`` seconds between them; return how many.

        With the partitioned layout, the settled partitions whose rows are all older are dropped instead (the
        count is the statistics' estimate of their rows), and only the default partition is purged in batches,
        with the idempotency keys taken before then."""
        query = self.queries.outbox_purge
        total = 0
        if await self.partitioned():
            seconds = older_than.total_seconds()
            try:
                total += int(await pooled.fetchval(self.pool, self.queries.outbox_drop_settled, seconds) or 0)
            except asyncpg.LockNotAvailableError:
                # Settles held the settled partitions for 200 ms: dropping waits for the next purge.
                log.info("schema %r: old settled partitions stay until the next purge (busy)", self.schema)
            await self._purge_batches(self.queries.idempotency_purge, seconds, batch, pause, None)
            query = self.queries.outbox_purge_default
        if on_batch is not None and total:
            on_batch(total)
        bound = min_id_for(datetime.now(UTC) - older_than)
        return total + await self._purge_batches(query, bound, batch, pause, on_batch)

    async def _purge_batches(
        self, query: str, bound: object, batch: int, pause: float, on_batch: Callable[[int], None] | None
    ) -> int:
        total = 0
        while True:
            status = await pooled.execute(self.pool, query, bound, batch)
            deleted = int(status.split()[-1])
            total += deleted
            if on_batch is not None:
                on_batch(deleted)
            if deleted < batch:
                return total
            if pause:
                await anyio.sleep(pause)

    async def partitioned(self) -> bool:
        """Whether the outbox has the partitioned layout (``eventbus migrate --partitioning``): asked each time
        until it has (an outbox can be converted while the bus runs, never back)."""
        if not self._partitioned:
            table = f"{quote_schema(self.schema)}.eventbus_outbox"
            self._partitioned = bool(await pooled.fetchval(self.pool, self.queries.outbox_partitioned, table))
        return self._partitioned

    async def layout(self) -> dict[str, Any] | None:
        """The partitioned layout's ``partitioning`` ("daily", "hourly") and how far its settled partitions reach
        (``settled_upto``); None for the plain layout."""
        if not await self.partitioned():
            return None
        row = await pooled.fetchrow(self.pool, self.queries.outbox_layout)
        assert row is not None
        return {"partitioning": {"day": "daily", "hour": "hourly"}[row["period"]], "settled_upto": row["settled_upto"]}

    async def extend(self) -> int:
        """With the partitioned layout, make the settled partitions of the next two periods; return how many
        were made (0 with the plain layout)."""
        if not await self.partitioned():
            return 0
        return int(await pooled.fetchval(self.pool, self.queries.outbox_extend) or 0)

    async def get(self, row_id: uuid.UUID) -> asyncpg.Record | None:
        return await pooled.fetchrow(self.pool, self.queries.outbox_get, row_id)

    async def counts(self) -> dict[str, Any]:
        """Rows by status (``pending``, ``claimed``, ``relayed``, ``dead``) and ``oldest_pending_seconds``,
        the age of the oldest due pending row (None when there is none)."""
        row = await pooled.fetchrow(self.pool, self.queries.outbox_counts)
        assert row is not None
        return dict(row.items())

    async def refresh_statistics(self) -> bool:
        """ANALYZE the outbox when it has outgrown its planner statistics; return whether it did.

        Autovacuum analyzes a table at most once a minute, and only after a tenth of its rows changed. Until then
        the plans each connection cached while the table was small stay, and can settle a few rows by a
        sequential scan of the whole outbox. The check is one catalog lookup; the ANALYZE runs at each doubling
        of the table.
        """
        if not await pooled.fetchval(self.pool, self.queries.outbox_outgrown):
            return False
        await pooled.execute(self.pool, self.queries.outbox_analyze)
        return True

    async def unsettled(self) -> int:
        """Rows still pending (due or delayed) or claimed."""
        return int(await pooled.fetchval(self.pool, self.queries.outbox_unsettled))

    async def ping(self) -> None:
        """One trivial statement: raises when the database cannot be reached."""
        await pooled.fetchval(self.pool, self.queries.ping)
