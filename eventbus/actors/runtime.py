"""Subscriber actors.

Each subscriber is an :class:`Actor`: a bounded mailbox (so a slow subscriber pushes back on the relay),
``concurrency`` workers, and, for an ordered subscriber, one lane per worker chosen by the key's hash so that a
key's events are handled one after another in the order they were sent. A worker that crashes is restarted by
its supervisor with backoff and resumes with the message it held; nothing it held is lost.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..events import Envelope
from ..handlers import Outcome, Subscription

__all__ = ["Actor", "BatchTracker", "Delivery"]

log = logging.getLogger("eventbus.actors")

#: A worker yields to the event loop at least once per this many deliveries.
_YIELD_EVERY = 64


class BatchTracker:
    """Collects the outcomes of one batch's deliveries; :meth:`wait` returns when every one has reported."""

    __slots__ = ("_done", "_remaining", "outcomes")

    def __init__(self) -> None:
        self.outcomes: list[Outcome | None] = []
        self._remaining = 1  # a guard released by seal(), so early reports cannot finish the batch
        self._done = anyio.Event()

    def slot(self) -> int:
        self.outcomes.append(None)
        self._remaining += 1
        return len(self.outcomes) - 1

    def report(self, index: int, outcome: Outcome) -> None:
        self.outcomes[index] = outcome
        self._remaining -= 1
        if self._remaining == 0:
            self._done.set()

    def seal(self) -> None:
        """No more slots will be added."""
        self._remaining -= 1
        if self._remaining == 0:
            self._done.set()

    async def wait(self) -> None:
        await self._done.wait()


@dataclass(slots=True)
class Delivery:
    envelope: Envelope
    tracker: BatchTracker
    index: int


@dataclass(slots=True)
class _Worker:
    receive: MemoryObjectReceiveStream[Delivery]
    current: Delivery | None = None


Handle = Callable[[Subscription, Delivery], Awaitable[Outcome]]


@dataclass
class Actor:
    """One subscriber's mailbox and workers."""

    subscription: Subscription
    handle: Handle
    mailbox_size: int = 256
    restart_backoff: float = 0.05
    _sends: list[MemoryObjectSendStream[Delivery]] = field(default_factory=list)
    _workers: list[_Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        sub = self.subscription
        if sub.ordered:
            for _ in range(sub.concurrency):
                send, receive = anyio.create_memory_object_stream[Delivery](self.mailbox_size)
                self._sends.append(send)
                self._workers.append(_Worker(receive))
        else:
            send, receive = anyio.create_memory_object_stream[Delivery](self.mailbox_size * sub.concurrency)
            self._sends.append(send)
            self._workers.append(_Worker(receive))
            self._workers.extend(_Worker(receive.clone()) for _ in range(sub.concurrency - 1))

    @property
    def name(self) -> str:
        return self.subscription.name

    async def send(self, delivery: Delivery) -> None:
        """Put a delivery in the mailbox, waiting while it is full."""
        if len(self._sends) == 1:
            stream = self._sends[0]
        else:
            envelope = delivery.envelope
            lane_key = envelope.key if envelope.key is not None else str(envelope.event_id)
            stream = self._sends[zlib.crc32(lane_key.encode()) % len(self._sends)]
        try:
            stream.send_nowait(delivery)  # no trip through the event loop while there is room
        except anyio.WouldBlock:
            await stream.send(delivery)

    def close(self) -> None:
        """Accept no more deliveries; workers finish what is queued, then :meth:`run` returns."""
        for send in self._sends:
            send.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for worker in self._workers:
                    tg.start_soon(self._supervise, worker)
                task_status.started()
        finally:
            # Cancelled (a stop past its timeout): close the mailbox too, or its send streams leak
            # (ResourceWarning: Unclosed MemoryObjectSendStream). Closing twice is harmless.
            self.close()

    async def _supervise(self, worker: _Worker) -> None:
        delay = self.restart_backoff
        with worker.receive:
            while True:
                try:
                    await self._work(worker)
                    return
                except Exception:
                    log.exception("subscriber %s: worker crashed; restarting in %.2f s", self.name, delay)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _work(self, worker: _Worker) -> None:
        unyielded = 0
        while True:
            if worker.current is None:
                try:
                    # Take what is queued without a trip through the event loop, but yield now and then so
                    # that handlers which never await cannot starve the relay.
                    if unyielded < _YIELD_EVERY:
                        unyielded += 1
                        worker.current = worker.receive.receive_nowait()
                    else:
                        unyielded = 0
                        worker.current = await worker.receive.receive()
                except anyio.WouldBlock:
                    unyielded = 0
                    try:
                        worker.current = await worker.receive.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
            delivery = worker.current
            outcome = await self.handle(self.subscription, delivery)
            worker.current = None
            delivery.tracker.report(delivery.index, outcome)
