"""The in-process transport: rows go to subscriber actors in this process."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import anyio
from anyio.abc import TaskStatus

from ..actors import Actor, BatchTracker, Delivery
from ..events import Envelope
from ..handlers import AttemptRunner, Outcome, Subscription, Verdict
from ..repository import Reason, Settlement, Status

__all__ = ["LocalTransport", "Unrouted"]

log = logging.getLogger("eventbus.transport.local")

#: What happens to an event no subscriber takes: a ``HandlerMissing`` dead letter, or nothing.
Unrouted = Literal["dead_letter", "drop"]


@dataclass
class Counters:
    delivered: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    duplicates_skipped: int = 0
    dropped: int = 0


@dataclass
class LocalTransport:
    subscriptions: Sequence[Subscription]
    runner: AttemptRunner
    unrouted: Unrouted = "dead_letter"
    mailbox_size: int = 256
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self.actors = {sub.name: Actor(sub, self._handle, self.mailbox_size) for sub in self.subscriptions}
        self.routes: dict[str, list[Actor]] = {}
        for actor in self.actors.values():
            for topic in actor.subscription.topics:
                self.routes.setdefault(topic, []).append(actor)

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
        attempt = envelope.attempts
        while True:
            outcome = await self.runner.run(sub, envelope, attempt)
            if outcome.verdict is Verdict.RETRY and sub.ordered:
                # An ordered subscriber retries in place: later events of the key wait behind this one.
                self.counters.failed += 1
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
            self.counters.dropped += 1
            settlement.settle(row, Status.PUBLISHED)
            return
        self.counters.dead_lettered += 1
        settlement.settle(row, Status.DEAD, error=why)
        settlement.dead_letter(row, Reason.HANDLER_MISSING, row.target, error_type="HandlerMissing", error=why)

    def _settle(self, row: Envelope, outcomes: list[tuple[str, Outcome | None]], s: Settlement) -> None:
        counters = self.counters
        dead = 0
        for name, outcome in outcomes:
            assert outcome is not None
            verdict = outcome.verdict
            if verdict is Verdict.DONE:
                counters.delivered += 1
            elif verdict is Verdict.DUPLICATE:
                counters.duplicates_skipped += 1
            elif verdict is Verdict.RETRY:
                counters.failed += 1
                counters.retried += 1
                if row.target is not None:
                    s.settle(row, Status.PENDING, delay=outcome.delay, error=outcome.error)
                    return
                s.retry(row, name, delay=outcome.delay, error=outcome.error)
            else:
                assert outcome.reason is not None
                counters.dead_lettered += 1
                if outcome.reason in (Reason.DELIVERY_FAILED, Reason.HANDLER_TIMEOUT):
                    counters.failed += 1
                dead += 1
                s.dead_letter(
                    row, outcome.reason, name, error_type=outcome.error_type, error=outcome.error,
                    attempts=outcome.attempts or row.attempts,
                )  # fmt: skip
        if dead == len(outcomes):
            s.settle(row, Status.DEAD, error=outcomes[-1][1].error if outcomes[-1][1] else None)
        else:
            s.settle(row, Status.PUBLISHED)
