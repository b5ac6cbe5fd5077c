"""The relay: claims committed rows, hands them to a transport, and writes the outcomes back as they arrive.

It wakes on the commit notification (LISTEN) and polls as a safety net, claims as many rows as it has room for
(``max_batches_in_flight`` batches' worth of rows not yet settled), hands them to the transport in the order it
claimed them, and settles each row once its subscribers are done with it, several rows to a statement (see
:mod:`eventbus._settler`). It renews the lease of rows still being handled and reclaims rows of relays that died.

Keyed rows are relayed by the owner of their key's partition alone, one process at a time per key. Relays share
the partitions evenly, through leases in ``eventbus_partitions`` that the claim and settle statements check
(fenced ownership: see :mod:`eventbus.repositories.relays`). A relay renews its leases every heartbeat; one
that cannot stops claiming keyed rows before its leases run out. When relays join, the others give up their
surplus: they stop claiming from a partition, let its rows settle, then release it. A relay that stops hands
its rows back and releases its partitions at once.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import secrets
import socket
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus

from ._driver import connect
from ._settler import Settler
from .events import PARTITIONS, Envelope, partition_of
from .observability import logs
from .observability.metrics import Metrics
from .repositories import (
    Carried,
    DeadLetterRepository,
    InboxRepository,
    OutboxRepository,
    RelayRepository,
    Settlement,
    Status,
    SubscriptionRepository,
)
from .transports import Transport

__all__ = ["Relay", "RelayConfig", "RelayStatistics"]

log = logging.getLogger("eventbus.relay")


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """How a relay claims and leases rows."""

    batch_size: int = 500
    lease: float = 30.0
    poll_interval: float = 1.0
    use_notify: bool = True
    #: How many batches' worth of rows may wait for their subscribers at once (rows detached from a laggard and
    #: rows targeted at one subscriber do not count: a subscriber's own backlog bounds those).
    max_batches_in_flight: int = 3
    reclaim_interval: float = 5.0
    heartbeat_interval: float = 2.0
    #: Delete relayed and dead outbox rows, replayed dead letters and inbox rows older than this (None: keep
    #: everything). Inbox rows of events with a dead letter not yet replayed stay.
    retention: timedelta | None = None
    #: The inbox's own window, when it should differ from ``retention`` (a redelivery older than it is not
    #: recognised as one: keep it longer than any row or replay can come back).
    inbox_retention: timedelta | None = None
    retention_interval: float = 60.0
    retention_batch: int = 1000
    retention_pause: float = 0.05
    #: ANALYZE the outbox whenever it has doubled since its last statistics (see
    #: :meth:`OutboxRepository.refresh_statistics`); needs the right to ANALYZE it (its owner has it).
    refresh_statistics: bool = True
    #: How often the relay elected to read the schema's gauges (pending, lag, dead letters) reads them, when an
    #: OpenTelemetry SDK meter provider is in use.
    metrics_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class RelayStatistics:
    worker: str
    batches: int
    claimed: int
    settled: int
    #: Rows claimed and not yet settled (continuations being handled here included).
    unsettled: int
    #: Statements that wrote outcomes.
    settle_statements: int
    partitions_owned: int
    partitions_ready: int
    listening: bool
    purged: int


class _Wakeup:
    """A resettable flag with a timed wait: set by notifications, cleared before each claim."""

    def __init__(self) -> None:
        self._flag = False
        self._event = anyio.Event()

    def set(self) -> None:
        self._flag = True
        self._event.set()

    def clear(self) -> None:
        self._flag = False
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self, timeout: float) -> None:
        if self._flag:
            return
        with anyio.move_on_after(timeout):
            await self._event.wait()


class Relay:
    def __init__(
        self,
        outbox: OutboxRepository,
        relays: RelayRepository,
        transport: Transport,
        dsn: str,
        config: RelayConfig | None = None,
        *,
        worker: str | None = None,
        dead_letters: DeadLetterRepository | None = None,
        subscriptions: SubscriptionRepository | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.outbox, self.relays, self.dead_letters = outbox, relays, dead_letters
        self.metrics = metrics if metrics is not None else Metrics.of()
        self.subscriptions = subscriptions
        self.inbox = InboxRepository(outbox.queries.schema)
        self.transport = transport
        self.dsn = dsn
        self.config = config or RelayConfig()
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._wakeup = _Wakeup()
        self._stopping = False
        self._stopped = anyio.Event()
        self._unsettled: dict[uuid.UUID, Envelope] = {}
        self._load: set[uuid.UUID] = set()  # the claimed rows that count against max_batches_in_flight
        self._due: list[float] = []  # when rows this relay made pending come due (a heap)
        self._room = anyio.Event()
        self._settler = Settler(self.outbox, self.worker, self.config.lease, self._written)
        self._partition_load: Counter[int] = Counter()
        self._session: asyncpg.Connection | None = None
        self._session_lock = anyio.Lock()
        self._claim_lock = anyio.Lock()
        self._analyze = self.config.refresh_statistics
        self._owned: set[int] = set()
        self._ready: set[int] = set()  # owned partitions no other relay still holds rows of
        self._draining: set[int] = set()  # owned partitions to give up once their rows are settled
        self._trusted_until = 0.0  # until when (anyio clock) the partition leases surely run
        self._distrusted = False  # the leases ran past trust and the partitions' deliveries were held back
        self._listening = False
        self._retention_leader = False
        self._metrics_leader = False
        # When (anyio clock) the claim loop last made progress (a claim, or a wait for room), and the partition
        # leases were last renewed: what readiness reports.
        self._progress_at = self._renewed_at = -math.inf
        # What this relay delivers, once registered (None: not yet; without a subscription repository, never).
        self._carried: list[Carried] | None = None
        self._purged = self._batches = self._claimed = self._settled = 0  # counters for statistics()

    # -- public ----------------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Claim now instead of at the next poll."""
        self._wakeup.set()

    def stop(self) -> None:
        """Stop claiming; rows in hand finish, then :meth:`run` returns."""
        self._stopping = True
        self.wake()  # the claim loop may be waiting for a notification, or for room
        self._room.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`run` has finished: outcomes written, rows and partitions handed back."""
        await self._stopped.wait()

    def health(self) -> dict[str, tuple[bool, str]]:
        """The relay's readiness checks, by name: whether each holds, and what it found. ``claiming``: the claim
        loop claimed (or waited for room) lately; ``leases``: the partition leases were renewed on time."""
        config = self.config
        now = anyio.current_time()
        claimed = now - self._progress_at
        renewed = now - self._renewed_at
        claim_bound = max(5.0, 3 * config.poll_interval)
        renew_bound = max(5.0, 3 * min(config.heartbeat_interval, config.lease / 3))
        return {
            "claiming": (claimed <= claim_bound, f"last claimed {claimed:.1f} s ago" if claimed < math.inf
                         else "not claimed yet"),
            "leases": (renewed <= renew_bound, f"renewed {renewed:.1f} s ago" if renewed < math.inf
                       else "not renewed yet"),
        }  # fmt: skip

    def statistics(self) -> RelayStatistics:
        return RelayStatistics(
            worker=self.worker, batches=self._batches, claimed=self._claimed, settled=self._settled,
            unsettled=len(self._unsettled), settle_statements=self._settler.statements,
            partitions_owned=len(self._owned), partitions_ready=len(self._ready),
            listening=self._listening, purged=self._purged,
        )  # fmt: skip

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        schema = self.outbox.schema
        self.metrics.relays[self.worker] = (schema, lambda: len(self._owned))
        try:
            async with anyio.create_task_group() as background:
                background.start_soon(self._session_loop)
                background.start_soon(self._maintenance_loop)
                background.start_soon(self._gauge_loop)
                background.start_soon(self._retention_loop)
                async with anyio.create_task_group() as settling:
                    await settling.start(self._settler.run)
                    async with anyio.create_task_group() as work:
                        await work.start(self.transport.run)
                        if self.subscriptions is not None:
                            # Registered once started, as a rule; if the database fails now, the claim loop retries.
                            with contextlib.suppress(Exception):
                                await self._register()
                        task_status.started()
                        logs.emit(log, logging.INFO, "relay %s started on schema %r carrying %s", self.worker, schema,
                                  ", ".join(c.name for c in self.transport.carried()) or "no subscribers",
                                  fields={"worker": self.worker, "schema": schema})  # fmt: skip
                        await self._claim_loop()
                        self.transport.close()
                    self._settler.close()
                background.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                # Bounded: against a database that does not answer, what is not handed back in time comes back
                # when its lease ends.
                with anyio.move_on_after(self.config.lease) as handing_back:
                    await self._settler.flush()
                    await self._release_unsettled()
                    await self._release_partitions()
                if handing_back.cancelled_caught:
                    log.warning("relay %s: could not hand its rows and partitions back in time; they come back when "
                                "their leases end", self.worker)  # fmt: skip
                await self._close_session()
                with anyio.move_on_after(2.0):
                    try:
                        await self.relays.forget(self.worker, stale_after=self.config.heartbeat_interval * 10)
                    except Exception:
                        log.debug("could not remove relay heartbeat row", exc_info=True)
            self.metrics.relays.pop(self.worker, None)
            self._drop_gauges()
            logs.emit(log, logging.INFO, "relay %s stopped: %d rows claimed, %d settled", self.worker, self._claimed,
                      self._settled, fields={"worker": self.worker, "schema": schema})  # fmt: skip
            self._stopped.set()

    # -- claiming --------------------------------------------------------------------------------------------

    def _claimable(self) -> list[int]:
        if anyio.current_time() >= self._trusted_until:
            return []  # the leases may have run out: claim no keyed row until they are renewed
        return sorted(self._ready - self._draining)

    async def _claim_loop(self) -> None:
        config = self.config
        capacity = config.batch_size * config.max_batches_in_flight
        failures = 0
        poll_started = anyio.current_time()  # start of the last claim made on the poll's cadence
        follow_up = False
        while not self._stopping:
            if self._carried is None and self.subscriptions is not None:
                try:
                    await self._register()
                except Exception as exc:
                    failures += 1
                    delay = self._backoff(failures)
                    log.warning("relay %s: registering its subscribers failed (%s); retrying in %.1f s",
                                self.worker, exc, delay)  # fmt: skip
                    await self._wakeup.wait(delay)
                    continue
            room = min(config.batch_size, capacity - len(self._load))
            # A claim waits for room for half a batch, or for nothing to be in hand: many small claims would cost
            # a statement each.
            if room <= 0 or (room < config.batch_size // 2 and self._load):
                self._progress_at = anyio.current_time()  # busy, not stuck
                self.transport.make_room()
                self._room = anyio.Event()
                with anyio.move_on_after(config.poll_interval):
                    await self._room.wait()
                continue
            self._wakeup.clear()
            claimed_at = anyio.current_time()
            if not follow_up:
                poll_started = claimed_at
            try:
                # Under the claim lock a partition cannot be given up between the claim and its tracking.
                async with self._claim_lock:
                    rows = await self.outbox.claim(
                        room, config.lease, self.worker, partitions=self._claimable(), skip=self.transport.full(),
                        skip_topics=self.transport.blocked_topics(), carried=self._carried,
                    )  # fmt: skip
                    self._track(rows)
            except Exception as exc:
                failures += 1
                delay = self._backoff(failures)
                log.warning("relay %s: claim failed (%s); retrying in %.1f s", self.worker, exc, delay)
                await self._wakeup.wait(delay)  # a notification (or the session coming back) cuts it short
                continue
            failures = 0
            self._progress_at = anyio.current_time()
            if rows:
                self._load.update(row.id for row in rows if row.target is None)
                if self._carried is not None:
                    # As the claim saw them: a pause holds back the very rows claimed after it, in order.
                    self.transport.hold(rows.paused)
                await self.transport.deliver(rows, self._report)
            if len(rows) == room or rows.more:  # a full batch, or a tenant's full share: claim again at once
                follow_up = False
                continue
            # A claim that found rows is followed by one more at once, for the rows committed while it ran: without
            # it they would wait a whole interval. Polls keep a steady cadence: the interval counts from the start
            # of the previous claim on the cadence (but a slow claim still leaves a tenth of an interval of rest).
            follow_up = bool(rows) and not follow_up
            if not follow_up:
                now = anyio.current_time()
                while self._due and self._due[0] <= now:
                    heapq.heappop(self._due)
                wait = max(config.poll_interval / 10, poll_started + config.poll_interval - now)
                if self._due:
                    wait = min(wait, self._due[0] - now)  # a retry comes due before the next poll
                await self._wakeup.wait(wait)

    def _backoff(self, failures: int) -> float:
        """How long to wait after ``failures`` failed claims in a row: doubling from 50 ms, at most one poll
        interval, so delivery resumes within one poll interval of the database coming back (or at once, when the
        session reconnects and wakes the claim loop)."""
        return min(self.config.poll_interval, 0.05 * 2.0 ** min(failures, 16))

    async def _register(self) -> None:
        """Register the subscribers this relay carries (before its first claim: from then on, no event settled
        anywhere is lost to them); hold back the paused ones."""
        assert self.subscriptions is not None
        carried = list(self.transport.carried())
        states = await self.subscriptions.register(
            self.worker, carried, live_within=self.config.heartbeat_interval * 3
        )
        for name, (_, was_retired) in states.items():
            if was_retired:
                log.warning("relay %s: subscriber %r had been retired; registered again, since this relay carries it",
                            self.worker, name)  # fmt: skip
        self.transport.hold({name for name, (state, _) in states.items() if state == "paused"})
        self._carried = carried
        self._settler.carried = carried

    def _track(self, rows: Sequence[Envelope], *, claimed: bool = True) -> None:
        if not rows:
            return
        if claimed:
            self._batches += 1
            self._claimed += len(rows)
        for row in rows:
            if self._unsettled.get(row.id) is not None:
                self._unsettled[row.id] = row  # claimed again while still in hand: counted once
                continue
            self._unsettled[row.id] = row
            partition = partition_of(row.key)
            if partition is not None:
                self._partition_load[partition] += 1

    def _report(self, row: Envelope, settlement: Settlement | None, leased: Sequence[Envelope]) -> None:
        """A row is done (or detached from its laggards): write it soon; keep the continuations leased."""
        if settlement is None:
            self._settler.add_relayed(row)
            return
        self._track(leased, claimed=False)
        self._settler.add(settlement)

    def _written(self, ids: list[uuid.UUID], settled: int, delays: list[float]) -> None:
        """A statement wrote the outcomes of these rows: they no longer take room. Rows it made pending come due
        after ``delays``: the claim loop wakes for them then (no notification announces a delayed row)."""
        self._settled += settled
        if delays and settled:
            now = anyio.current_time()
            earliest = self._due[0] if self._due else math.inf
            for delay in set(delays):
                heapq.heappush(self._due, now + delay)
            if self._due[0] < earliest:
                self._wakeup.set()  # the claim loop may be waiting past it: it claims, then waits anew
        for row_id in ids:
            row = self._unsettled.pop(row_id, None)
            if row is not None:
                partition = partition_of(row.key)
                if partition is not None:
                    self._partition_load[partition] -= 1
            self._load.discard(row_id)
        self._room.set()

    async def _release_unsettled(self) -> None:
        """On shutdown, hand rows still held back to pending so another relay need not wait for the lease."""
        if not self._unsettled:
            return
        settlement = Settlement()
        for row in self._unsettled.values():
            settlement.mark(row, Status.PENDING, error="relay stopped before the row was settled")
        try:
            await self.outbox.settle(self.worker, settlement)
        except Exception:
            log.warning("relay %s: could not release %d rows; they return when their lease ends",
                        self.worker, len(settlement))
        self._unsettled.clear()

    # -- the session connection: LISTEN and partition ownership ----------------------------------------------

    async def _session_loop(self) -> None:
        delay = 0.2
        lost = False
        while True:
            try:
                conn = await connect(self.dsn)
            except Exception as exc:
                log.warning("relay %s: session connection failed (%s); polling meanwhile", self.worker, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.2
            try:
                if self.config.use_notify:
                    await conn.add_listener(self.outbox.channel, self._on_notify)
                    self._listening = True
                self._session = conn
                if lost:
                    logs.emit(log, logging.INFO, "relay %s: session connection back", self.worker,
                              fields={"worker": self.worker})  # fmt: skip
                    lost = False
                self._wakeup.set()  # notifications may have been missed while disconnected
                while True:
                    await anyio.sleep(self.config.heartbeat_interval)
                    async with self._session_lock:
                        with anyio.fail_after(max(5.0, self.config.heartbeat_interval)):
                            await conn.fetchval(self.outbox.queries.ping)
            except Exception as exc:
                log.warning("relay %s: session connection lost (%s); reconnecting", self.worker, exc)
                lost = True
            finally:
                self._listening = False
                self._retention_leader = False
                self._metrics_leader = False  # the lock went with the session: another relay may read them now
                self._drop_gauges()
                self._session = None
                conn.terminate()

    def _on_notify(self, *_args: Any) -> None:
        self._wakeup.set()

    async def _close_session(self) -> None:
        if self._session is not None:
            self._session.terminate()
            self._session = None

    async def _rebalance(self) -> None:
        """Renew the partition leases, give up a surplus, take a fair share; a newly owned partition is claimable
        once no other relay holds rows of it (they settle, or come back when their lease ends)."""
        config = self.config
        started = anyio.current_time()
        renewed = await self.relays.renew(self.worker, sorted(self._owned), config.lease) if self._owned else {}
        self._trusted_until = started + config.lease * 0.8
        self._renewed_at = started
        self._distrusted = False
        async with self._claim_lock:
            lost = self._owned - renewed.keys()
            if lost:
                log.warning("relay %s: lost partitions %s (their lease ran out)", self.worker, sorted(lost))
                self.transport.revoke(lost)
                self._owned -= lost
                self._ready -= lost
                self._draining -= lost
        states = await self.relays.heartbeat(
            self.worker, socket.gethostname(), os.getpid(), sorted(self._owned), self._carried or (),
            live_within=config.heartbeat_interval * 3, unreachable_for=self.transport.unreachable_for(),
        )  # fmt: skip
        if self._carried is not None:
            if "unregistered" in states.values():
                await self._register()  # its registration was removed: make it again
            else:
                self.transport.hold({name for name, state in states.items() if state == "paused"})
        alive = await self.relays.alive(within=config.heartbeat_interval * 3)
        target = math.ceil(PARTITIONS / max(1, len(alive)))
        # Stop claiming from the surplus (those already draining first); each is released once its rows settled.
        surplus = max(0, len(self._owned) - target)
        ranked = sorted(self._owned, key=lambda p: (p not in self._draining, -p))
        self._draining = set(ranked[:surplus])
        async with self._claim_lock:
            done = {p for p in self._draining if self._partition_load[p] == 0}
            if done:
                await self.relays.release(self.worker, sorted(done))
                self._owned -= done
                self._ready -= done
                self._draining -= done
                logs.emit(log, logging.INFO, "relay %s: handed over partitions %s (now owns %d)", self.worker,
                          sorted(done), len(self._owned),
                          fields={"worker": self.worker, "partitions": sorted(done)})  # fmt: skip
        wanted = target - len(self._owned)
        if wanted > 0:
            owned = self._owned
            free = [r["partition"] for r in await self.relays.owners() if not r["live"] and r["partition"] not in owned]
            start = int(self.worker.encode().hex(), 16) % PARTITIONS
            free.sort(key=lambda p: (p - start) % PARTITIONS)
            taken = await self.relays.acquire(self.worker, free[:wanted], config.lease, held=self._unsettled.keys())
            self._owned |= taken.keys()
            if taken:
                logs.emit(log, logging.INFO, "relay %s: took partitions %s (now owns %d)", self.worker, sorted(taken),
                          len(self._owned), fields={"worker": self.worker, "partitions": sorted(taken)})  # fmt: skip
        waiting = self._owned - self._ready
        if waiting:
            busy = await self.relays.busy_partitions(sorted(waiting), self.worker)
            # Rows this relay still holds of a partition it took back settle first: a share it did not run
            # goes back to pending only then, and the key's later rows must not overtake it.
            newly_ready = {p for p in waiting - busy if not self._partition_load[p]}
            if newly_ready:
                self._ready |= newly_ready
                self._wakeup.set()

    def _distrust(self) -> None:
        """The partition leases could not be renewed for most of a lease: another relay may own the partitions
        soon. Start none of their deliveries waiting here, and claim from them again only once this relay's rows
        of them have come back (as for a partition taken anew)."""
        if not self._owned or anyio.current_time() < self._trusted_until or self._distrusted:
            return
        self._distrusted = True
        log.warning("relay %s: could not renew its partition leases; holding back the deliveries of its %d "
                    "partitions", self.worker, len(self._owned))  # fmt: skip
        self.transport.revoke(self._owned)
        self._ready -= self._owned

    async def _release_partitions(self) -> None:
        """At a stop, after the rows were handed back: the partitions go at once, no lease need run out."""
        try:
            # Every partition the database says is this relay's, also one whose acquisition it never heard back.
            await self.relays.release(self.worker, range(PARTITIONS))
        except Exception:
            log.warning("relay %s: could not release its partitions; others take them when the lease ends",
                        self.worker)  # fmt: skip
        self._owned.clear()
        self._ready.clear()

    # -- maintenance -----------------------------------------------------------------------------------------

    async def _retention_loop(self) -> None:
        """On the one relay holding the retention lock, purge old relayed rows and replayed dead letters
        in small batches with pauses, so claims never wait behind a long delete; with the partitioned outbox,
        make its settled partitions ahead and drop those past retention. The layout is asked each round until it
        is partitioned: an outbox converted while relays run gets its partitions made by one of them."""
        config = self.config
        while True:
            try:
                partitioned = await self.outbox.partitioned()
                if partitioned or config.retention is not None or config.inbox_retention is not None:
                    await self._upkeep(partitioned)
            except Exception as exc:
                log.warning("relay %s: retention purge failed (%s); will retry", self.worker, exc)
            await anyio.sleep(config.retention_interval)

    async def _upkeep(self, partitioned: bool) -> None:
        config = self.config
        session = self._session
        if session is not None and not self._retention_leader:
            async with self._session_lock:
                self._retention_leader = await self.relays.lead_retention(session)
        if not self._retention_leader:
            return
        if partitioned:
            try:
                await self.outbox.extend()
            except Exception as exc:  # the purges below do not depend on it
                log.warning("relay %s: making the outbox's settled partitions ahead failed (%s); will retry",
                            self.worker, exc)  # fmt: skip
        if config.retention is not None:
            self._purged += await self.outbox.purge(
                config.retention, batch=config.retention_batch, pause=config.retention_pause
            )
            if self.dead_letters is not None:
                await self.dead_letters.purge(config.retention, batch=config.retention_batch)
        inbox_window = config.inbox_retention or config.retention
        if inbox_window is not None:
            self._purged += await self.inbox.purge(
                self.outbox.pool, inbox_window, batch=config.retention_batch, pause=config.retention_pause
            )

    async def _gauge_loop(self) -> None:
        """While an SDK meter provider is in use: on the one relay of the schema holding the metrics lock, read
        the schema's gauges every ``metrics_interval`` seconds, in one statement (see ``metrics_gauges``). The
        instruments report what was read last; the other relays try for the lock each interval."""
        schema = self.outbox.schema
        while True:
            if self.metrics.enabled:
                try:
                    session = self._session
                    if session is not None and not self._metrics_leader:
                        with anyio.fail_after(5.0):
                            async with self._session_lock:
                                self._metrics_leader = await self.relays.lead_metrics(session)
                        if self._metrics_leader:
                            logs.emit(log, logging.INFO, "relay %s reads the gauges of schema %r", self.worker, schema,
                                      fields={"worker": self.worker, "schema": schema})  # fmt: skip
                    if self._metrics_leader:
                        gauges = await self.relays.gauges()
                        # Still the leader, on the same session: a session lost meanwhile took the lock with it.
                        if self._metrics_leader and self._session is session:
                            gauges.reader = self.worker
                            self.metrics.gauges[schema] = gauges
                except Exception as exc:
                    self._drop_gauges()  # no figures rather than stale ones (alert on their absence)
                    log.warning("relay %s: reading the gauges failed (%s); will retry", self.worker, exc)
            await anyio.sleep(self.config.metrics_interval)

    def _drop_gauges(self) -> None:
        """Stop reporting the schema's gauges, if this relay reports them."""
        schema = self.outbox.schema
        gauges = self.metrics.gauges.get(schema)
        if gauges is not None and gauges.reader == self.worker:
            del self.metrics.gauges[schema]

    async def _refresh_statistics(self) -> None:
        if not self._analyze:
            return
        try:
            if await self.outbox.refresh_statistics():
                log.debug("relay %s: analyzed the outbox (it outgrew its planner statistics)", self.worker)
        except asyncpg.InsufficientPrivilegeError as exc:
            self._analyze = False
            log.warning("relay %s: cannot ANALYZE the outbox (%s); leaving its statistics to autovacuum. Grant "
                        "the relay's role ownership of the table, or set RelayConfig(refresh_statistics=False)",
                        self.worker, exc)  # fmt: skip
        except Exception as exc:
            log.warning("relay %s: could not refresh the outbox's statistics (%s); will retry", self.worker, exc)

    async def _maintenance_loop(self) -> None:
        config = self.config
        tick = min(config.heartbeat_interval, config.lease / 3, config.reclaim_interval)
        last_reclaim = last_renew = anyio.current_time()
        last_beat = -math.inf  # take partitions at once
        last_heartbeat = now = anyio.current_time()
        while True:
            now = anyio.current_time()
            # Partition leases first, in a step of their own: nothing else may delay or skip their renewal.
            if now - last_beat >= min(config.heartbeat_interval, config.lease / 3):
                last_beat = now
                try:
                    await self._rebalance()
                except Exception as exc:
                    log.warning("relay %s: renewing partitions failed (%s); will retry", self.worker, exc)
            self._distrust()
            try:
                if self._unsettled and now - last_renew >= config.lease / 3:
                    last_renew = now
                    await self.outbox.renew(self.worker, list(self._unsettled), config.lease)
                if now - last_reclaim >= config.reclaim_interval:
                    last_reclaim = now
                    if await self.outbox.reclaim():
                        self._wakeup.set()
                if now - last_heartbeat >= config.heartbeat_interval:
                    last_heartbeat = now
                    await self._refresh_statistics()
                    await self.relays.forget("", stale_after=config.heartbeat_interval * 10)
            except Exception as exc:
                log.warning("relay %s: maintenance failed (%s); will retry", self.worker, exc)
            await anyio.sleep(tick)
