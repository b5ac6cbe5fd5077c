"""The in-process transport: rows go to subscriber actors in this process."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import anyio
from anyio.abc import TaskStatus

from ..actors import Actor, BatchTracker, Delivery
from ..errors import ConfigurationError
from ..events import Envelope
from ..handlers import AttemptRunner, Outcome, Subscription, Verdict
from ..repositories import Reason, Settlement, Status
from . import DeliveryStatistics, Unrouted

__all__ = ["LocalTransport"]


class LocalTransport:
    """Delivers to subscriber actors in this process: one bounded mailbox of ``mailbox_size`` deliveries per
    worker (a full mailbox makes the relay wait)."""

    def __init__(self, *, mailbox_size: int = 256) -> None:
        if mailbox_size < 1:
            raise ConfigurationError(f"mailbox_size must be at least 1, not {mailbox_size}")
        self.mailbox_size = mailbox_size
        self.unrouted: Unrouted = "dead_letter"
        self.actors: dict[str, Actor] = {}
        self.routes: dict[str, list[Actor]] = {}
        #: What :meth:`statistics` reports, by the names of :class:`DeliveryStatistics`.
        self.counters: Counter[str] = Counter()
        self._runner: AttemptRunner | None = None

    def attach(self, subscriptions: Sequence[Subscription], runner: AttemptRunner, *, unrouted: Unrouted) -> None:
        self._runner = runner
        self.unrouted = unrouted
        self.counters.clear()
        self.actors = {sub.name: Actor(sub, self._handle, self.mailbox_size) for sub in subscriptions}
        self.routes = {}
        for actor in self.actors.values():
            for topic in actor.subscription.topics:
                self.routes.setdefault(topic, []).append(actor)

    def statistics(self) -> DeliveryStatistics:
        return DeliveryStatistics(**self.counters)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for actor in self.actors.values():
                await tg.start(actor.run)
            task_status.started()

    def close(self) -> None:
        for actor in self.actors.values():
            actor.close()

    async def _handle(self, sub: Subscription, delivery: Delivery) -> Outcome:
        envelope = delivery.envelope
        if envelope.attempts > sub.max_attempts:
            return Outcome(
                Verdict.DEAD, reason=Reason.DELIVERY_FAILED, error_type="AttemptsExhausted",
                error=f"claimed {envelope.attempts} times, more than max_attempts={sub.max_attempts}: earlier "
                "attempts never finished (the process died or its lease ran out while handling)",
                attempts=envelope.attempts,
            )  # fmt: skip
        assert self._runner is not None, "attach() comes first"
        attempt = envelope.attempts
        while True:
            outcome = await self._runner.run(sub, envelope, attempt)
            if outcome.verdict is Verdict.RETRY and sub.ordered:
                # An ordered subscriber retries in place: later events of the key wait behind this one.
                self.counters["failed"] += 1
                await anyio.sleep(outcome.delay)
                attempt += 1
                continue
            return outcome

    async def deliver(self, rows: Sequence[Envelope], settlement: Settlement) -> None:
        tracker = BatchTracker()
        plan: list[list[tuple[str, int]]] = []
        missing: dict[int, str] = {}
        for position, row in enumerate(rows):
            if row.target is not None:
                actor = self.actors.get(row.target)
                actors = [actor] if actor is not None else []
            else:
                actors = self.routes.get(row.topic, [])
            slots = []
            for actor in actors:
                index = tracker.slot()
                slots.append((actor.name, index))
                await actor.send(Delivery(row, tracker, index))
            if not actors:
                missing[position] = (
                    f"no subscriber named {row.target!r} in this process" if row.target is not None
                    else f"no subscriber for topic {row.topic!r} in this process"
                )
            plan.append(slots)
        tracker.seal()
        await tracker.wait()
        for position, row in enumerate(rows):
            if position in missing:
                self._unrouted(row, missing[position], settlement)
            else:
                self._settle(row, [(name, tracker.outcomes[i]) for name, i in plan[position]], settlement)

    def _unrouted(self, row: Envelope, why: str, settlement: Settlement) -> None:
        if self.unrouted == "drop" and row.target is None:
            self.counters["dropped"] += 1
            settlement.mark(row, Status.RELAYED)
            return
        self.counters["dead_lettered"] += 1
        settlement.mark(row, Status.DEAD, error=why)
        settlement.dead_letter(row, Reason.HANDLER_MISSING, row.target, error_type="HandlerMissing", error=why)

    def _settle(self, row: Envelope, outcomes: list[tuple[str, Outcome | None]], s: Settlement) -> None:
        counters = self.counters
        dead = 0
        for name, outcome in outcomes:
            assert outcome is not None
            verdict = outcome.verdict
            if verdict is Verdict.DONE:
                counters["delivered"] += 1
            elif verdict is Verdict.DUPLICATE:
                counters["duplicates_skipped"] += 1
            elif verdict is Verdict.RETRY:
                counters["failed"] += 1
                counters["retried"] += 1
                if row.target is not None:
                    s.mark(row, Status.PENDING, delay=outcome.delay, error=outcome.error)
                    return
                s.retry(row, name, delay=outcome.delay, error=outcome.error)
            else:
                assert outcome.reason is not None
                counters["dead_lettered"] += 1
                if outcome.reason in (Reason.DELIVERY_FAILED, Reason.HANDLER_TIMEOUT):
                    counters["failed"] += 1
                dead += 1
                s.dead_letter(
                    row, outcome.reason, name, error_type=outcome.error_type, error=outcome.error,
                    attempts=outcome.attempts or row.attempts,
                )  # fmt: skip
        if dead == len(outcomes):
            s.mark(row, Status.DEAD, error=outcomes[-1][1].error if outcomes[-1][1] else None)
        else:
            s.mark(row, Status.RELAYED)
