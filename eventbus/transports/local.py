"""The in-process transport: rows go to subscriber actors in this process.

Rows are handed to the actors in the order the relay claimed them, without waiting, so no batch can overtake
another on the way in. Each row is reported to the relay as soon as every subscriber it went to has an outcome;
it does not wait for its batch. A subscriber that holds a row up for longer than ``detach_after`` seconds (slow,
hung, or retrying in place) is detached from it when another subscriber is done with the row, or when the relay
has no room left: the row settles for the others, and a continuation row with the same event id carries the
laggard's share on, claimed by this relay when its handler runs (or holds its
place in an ordered key), pending when it had not started. The relay claims pending rows targeted at a
subscriber only while that subscriber's backlog is below ``mailbox_size``.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from ..actors import Actor, Delivery
from ..errors import ConfigurationError
from ..events import Envelope, partition_of
from ..handlers import DONE, REVOKED, AttemptRunner, Outcome, Subscription, Verdict
from ..repositories import Carried, Reason, Settlement, Status
from . import DeliveryStatistics, Report, Unrouted, unrouted_settlement

__all__ = ["LocalTransport"]


@dataclass(slots=True, eq=False)
class _Row:
    """A claimed row on its way through the subscribers it went to."""

    envelope: Envelope
    dispatched_at: float
    waiting: dict[str, Delivery] = field(default_factory=dict)
    outcomes: list[tuple[str, Outcome]] = field(default_factory=list)
    #: Paused subscribers of the row's topic: their shares go on as pending rows targeted at them.
    held: list[str] = field(default_factory=list)


class LocalTransport:
    """Delivers to subscriber actors in this process. Rows targeted at one subscriber (retries, continuations,
    replays) are claimed for it only while its backlog is below ``mailbox_size``; ``detach_after`` is how long a
    subscriber may hold a row up for the others."""

    def __init__(self, *, mailbox_size: int = 256, detach_after: float = 1.0) -> None:
        if mailbox_size < 1:
            raise ConfigurationError(f"mailbox_size must be at least 1, not {mailbox_size}")
        if not detach_after > 0:
            raise ConfigurationError(f"detach_after must be more than 0 seconds, not {detach_after!r}")
        self.mailbox_size = mailbox_size
        self.detach_after = detach_after
        self.unrouted: Unrouted = "dead_letter"
        self.actors: dict[str, Actor] = {}
        self.routes: dict[str, list[Actor]] = {}
        #: What :meth:`statistics` reports, by the names of :class:`DeliveryStatistics`.
        self.counters: Counter[str] = Counter()
        self._runner: AttemptRunner | None = None
        self._report: Report | None = None
        self._rows: dict[uuid.UUID, _Row] = {}  # rows not yet reported, in the order they came
        self._held: set[str] = set()
        self._revoked: dict[int, float] = {}  # partition -> when the relay lost it

    def attach(
        self, subscriptions: Sequence[Subscription], runner: AttemptRunner, *, unrouted: Unrouted,
        schema: str = "eventbus", lease: float = 30.0,
    ) -> None:  # fmt: skip
        self._runner = runner
        self.unrouted = unrouted
        self.counters.clear()
        self._rows.clear()
        self._closing = anyio.Event()
        self.actors = {
            sub.name: Actor(sub, self._attempt, self._reported, retrying=self._retrying) for sub in subscriptions
        }
        self.routes = {}
        for actor in self.actors.values():
            for topic in actor.subscription.topics:
                self.routes.setdefault(topic, []).append(actor)

    def statistics(self) -> DeliveryStatistics:
        return DeliveryStatistics(**self.counters)

    def carried(self) -> list[Carried]:
        return [
            Carried(actor.name, actor.subscription.topics, actor.subscription.ordered) for actor in self.actors.values()
        ]

    def revoke(self, partitions: Collection[int]) -> None:
        """The relay lost these key partitions: deliveries of their rows that came before now and have not
        started are not run; their shares go back to pending (for the partition's new owner)."""
        now = anyio.current_time()
        for partition in partitions:
            self._revoked[partition] = now

    def unreachable_for(self) -> float | None:
        """No broker: always None."""
        return None

    def hold(self, names: Collection[str]) -> None:
        """Deliver no new rows to these (paused) subscribers: their shares of a row become pending rows targeted
        at them, claimed once they are resumed."""
        self._held = set(names)

    def full(self) -> list[str]:
        """Unordered subscribers whose backlog is full: the relay claims no rows targeted at them meanwhile.
        (Skipping an ordered subscriber's targeted row could let the key's later events overtake it.)"""
        return [actor.name for actor in self._without_room() if not actor.subscription.ordered]

    def blocked_topics(self) -> list[str]:
        """Topics of ordered subscribers whose backlog is full: the relay claims none of their untargeted rows
        meanwhile, so that a subscriber that hangs cannot pile up rows without bound (its key order forbids
        leaving its share behind)."""
        ordered = (actor for actor in self._without_room() if actor.subscription.ordered)
        return sorted({topic for actor in ordered for topic in actor.subscription.topics})

    def _without_room(self) -> list[Actor]:
        return [actor for actor in self.actors.values() if actor.backlog >= self.mailbox_size]

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for actor in self.actors.values():
                await tg.start(actor.run)
            detaching = anyio.CancelScope()
            tg.start_soon(self._detach_laggards, detaching)
            task_status.started()
            await self._closing.wait()
            detaching.cancel()

    def close(self) -> None:
        self._closing.set()
        for actor in self.actors.values():
            actor.close()

    # -- in --------------------------------------------------------------------------------------------------

    async def deliver(self, rows: Sequence[Envelope], report: Report) -> None:
        self._report = report
        now = anyio.current_time()
        for row in rows:
            held = self._rows.get(row.id)
            if held is not None:
                # Claimed again while still in hand here (its lease ran out mid-handling): the handlers running
                # it settle the new claim.
                held.envelope = row
                for delivery in held.waiting.values():
                    delivery.envelope = row
                continue
            if row.target is not None:
                actor = self.actors.get(row.target)
                # A subscriber gets only rows of its own topics (a row of a topic it dropped is nobody's here).
                actors = [actor] if actor is not None and row.topic in actor.subscription.topics else []
            else:
                actors = self.routes.get(row.topic, [])
            paused: list[str] = []
            if self._held and row.target is None:
                paused = [actor.name for actor in actors if actor.name in self._held]
                actors = [actor for actor in actors if actor.name not in self._held]
            if not actors:
                if paused:
                    self._finish(_Row(row, now, held=paused))
                else:
                    self._unrouted(row, report)
                continue
            state = _Row(row, now, held=paused)
            for actor in actors:
                delivery = Delivery(row, row.attempts, actor.name, state)
                state.waiting[actor.name] = delivery
                actor.send_nowait(delivery)
            self._rows[row.id] = state

    def _unrouted(self, row: Envelope, report: Report) -> None:
        self.counters["dropped" if self.unrouted == "drop" and row.target is None else "dead_lettered"] += 1
        report(row, unrouted_settlement(row, self.unrouted), ())

    # -- attempts and outcomes ---------------------------------------------------------------------------------

    async def _attempt(self, sub: Subscription, delivery: Delivery) -> Outcome:
        envelope = delivery.envelope
        if self._closing.is_set():
            return self._not_run(delivery)  # the relay stops: what has not started waits for the next relay
        if self._revoked:
            partition = partition_of(envelope.key)
            lost_at = self._revoked.get(partition) if partition is not None else None
            if lost_at is not None and lost_at >= delivery.owner.dispatched_at:
                return self._not_run(delivery)
        assert self._runner is not None, "attach() comes first"
        if envelope.attempts > sub.max_attempts:
            return await self._runner.exhausted(sub, envelope, "the process died or its lease ran out while handling")
        return await self._runner.run(sub, envelope, delivery.attempt)

    @staticmethod
    def _not_run(delivery: Delivery) -> Outcome:
        """The outcome of a delivery the relay will not run now; ``attempts`` 0 when no attempt of it ran under
        this claim (an ordered retry in place already ran one)."""
        ran = delivery.attempt > delivery.envelope.attempts
        return Outcome(Verdict.REVOKED, attempts=delivery.attempt) if ran else REVOKED

    def _retrying(self, delivery: Delivery, outcome: Outcome) -> None:
        self.counters["failed"] += 1

    def _reported(self, delivery: Delivery, outcome: Outcome) -> None:
        state: _Row = delivery.owner
        if delivery.envelope is not state.envelope:
            # A detached share: its outcome settles the continuation row it now travels on.
            settlement = Settlement()
            self._settle(delivery.envelope, [(delivery.subscriber, outcome)], [], settlement)
            self._reported_row(delivery.envelope, settlement, ())
            return
        del state.waiting[delivery.subscriber]
        state.outcomes.append((delivery.subscriber, outcome))
        if not state.waiting:
            self._rows.pop(state.envelope.id, None)
            self._finish(state)

    def _finish(self, state: _Row) -> None:
        outcomes = state.outcomes
        if not state.held and (
            (len(outcomes) == 1 and outcomes[0][1] is DONE) or all(outcome is DONE for _, outcome in outcomes)
        ):
            self.counters["delivered"] += len(outcomes)
            self._reported_row(state.envelope, None, ())  # the common case: relayed, nothing else to write
            return
        settlement = Settlement()
        if not state.held and all(outcome.verdict is Verdict.REVOKED for _, outcome in outcomes):
            # Not run by any subscriber: the row goes back as it is, with its attempt if none of it ran.
            self.counters["revoked"] += len(outcomes)
            unrun = all(outcome.attempts == 0 for _, outcome in outcomes)
            settlement.mark(state.envelope, Status.PENDING, refund=unrun)
            self._reported_row(state.envelope, settlement, ())
            return
        held = [settlement.continuation(state.envelope, name, leased=False) for name in state.held]
        self._settle(state.envelope, state.outcomes, held, settlement)
        self._reported_row(state.envelope, settlement, ())

    def _reported_row(self, row: Envelope, settlement: Settlement | None, leased: Sequence[Envelope]) -> None:
        assert self._report is not None
        self._report(row, settlement, leased)

    async def _detach_laggards(self, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(self.detach_after / 4)
                for state in self._late():
                    if state.outcomes:  # another subscriber is done with it and waits for the laggard
                        self._detach(state)

    def make_room(self) -> None:
        """Detach every row held up for longer than ``detach_after``: the relay has no room for new rows."""
        for state in self._late():
            self._detach(state)

    def _late(self) -> list[_Row]:
        bound = anyio.current_time() - self.detach_after
        late = []
        for state in self._rows.values():
            if state.dispatched_at > bound:
                break
            late.append(state)
        return late

    def _detach(self, state: _Row) -> None:
        """Settle a row for the subscribers done with it; continuations carry the shares still being worked on."""
        row = state.envelope
        if row.target is not None:
            return  # one subscriber's own row: detaching it would only copy it
        del self._rows[row.id]
        settlement = Settlement()
        continuations = [settlement.continuation(row, name, leased=False) for name in state.held]
        leased: list[Envelope] = []
        for name, delivery in state.waiting.items():
            if self.actors[name].withdraw(delivery):
                continuations.append(settlement.continuation(row, name, leased=False))
            else:
                continuation = settlement.continuation(row, name, leased=True)
                delivery.envelope = continuation
                continuations.append(continuation)
                leased.append(continuation)
        state.waiting.clear()
        self._settle(row, state.outcomes, continuations, settlement)
        self._reported_row(row, settlement, leased)

    def _settle(
        self, row: Envelope, outcomes: list[tuple[str, Outcome]], continuations: list[Envelope], s: Settlement
    ) -> None:
        """Record a row's final status and what its subscribers' outcomes write."""
        counters = self.counters
        dead = 0
        for name, outcome in outcomes:
            verdict = outcome.verdict
            if verdict is Verdict.DONE:
                counters["delivered"] += 1
            elif verdict is Verdict.DUPLICATE:
                counters["duplicates_skipped"] += 1
            elif verdict is Verdict.REVOKED:
                counters["revoked"] += 1
                if row.target is not None:
                    s.mark(row, Status.PENDING, refund=outcome.attempts == 0)
                    return
                continuations.append(s.continuation(row, name, leased=False))
            elif verdict is Verdict.RETRY:
                counters["failed"] += 1
                counters["retried"] += 1
                # The backoff runs from the failure, not from now.
                delay = max(0.0, outcome.failed_at + outcome.delay - anyio.current_time())
                if row.target is not None:
                    s.mark(row, Status.PENDING, delay=delay, error=outcome.error)
                    return
                s.retry(row, name, delay=delay, error=outcome.error)
            else:
                assert outcome.reason is not None
                counters["dead_lettered"] += 1
                if outcome.reason in (Reason.DELIVERY_FAILED, Reason.HANDLER_TIMEOUT):
                    counters["failed"] += 1
                dead += 1
                s.dead_letter(
                    row, outcome.reason, name, error_type=outcome.error_type, error=outcome.error,
                    attempts=outcome.attempts or row.attempts, traceback=outcome.traceback, trace_id=outcome.trace_id,
                )  # fmt: skip
        if outcomes and dead == len(outcomes) and not continuations:
            s.mark(row, Status.DEAD, error=outcomes[-1][1].error)
        else:
            s.mark(row, Status.RELAYED)
