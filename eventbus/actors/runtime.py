"""Subscriber actors.

Each subscriber is an :class:`Actor`: a queue of deliveries and ``concurrency`` workers under a supervisor.
Deliveries are put in synchronously, in the order the relay claimed them, so nothing can overtake on the way in.

- An unordered subscriber's workers take deliveries first in, first out within a tenant, and the tenants in turn
  (one delivery of each tenant with deliveries queued, then the next round): one tenant's backlog delays another
  tenant's events by one delivery per worker, not by the backlog.
- An ordered subscriber keeps one queue per key of a tenant. A key is handled by one worker at a time, head
  first; a delivery that is to be retried in place parks its key until its backoff ends, and the workers go on
  with the other keys meanwhile. So a key's events are handled one at a time in the order they came, and a key
  that retries holds up only itself. Keys ready to run are taken the tenants in turn, too.

A worker that crashes is restarted by its supervisor with backoff; the delivery it held goes back to the head of
its key, and nothing it held is lost.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from ..events import Envelope
from ..handlers import Outcome, Subscription, Verdict

__all__ = ["Actor", "Delivery"]

log = logging.getLogger("eventbus.actors")

#: A worker yields to the event loop at least once per this many deliveries.
_YIELD_EVERY = 64


@dataclass(slots=True, eq=False)
class Delivery:
    """One subscriber's share of a claimed row: the envelope to hand to the handler (the row itself, or the
    continuation row that carries this share once it is detached) and the attempt to run next."""

    envelope: Envelope
    attempt: int
    subscriber: str
    #: What the transport tracks about the row (opaque here).
    owner: Any = None
    started: bool = False


class _Turns:
    """Items queued per tenant, taken the tenants in turn: first in, first out within a tenant; one item of each
    tenant with items, then the next round. With one tenant, a plain first-in-first-out queue."""

    __slots__ = ("_by_tenant", "_size", "_turns")

    def __init__(self) -> None:
        self._by_tenant: dict[str, deque[Any]] = {}
        self._turns: deque[str] = deque()  # tenants with items, in the order of their next turn
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, tenant: str, item: Any) -> None:
        queue = self._by_tenant.get(tenant)
        if queue is None:
            queue = self._by_tenant[tenant] = deque()
            self._turns.append(tenant)
        queue.append(item)
        self._size += 1

    def appendleft(self, tenant: str, item: Any) -> None:
        """Put an item back at the head: its tenant's turn comes first."""
        queue = self._by_tenant.get(tenant)
        if queue is None:
            queue = self._by_tenant[tenant] = deque()
        else:
            self._turns.remove(tenant)
        self._turns.appendleft(tenant)
        queue.appendleft(item)
        self._size += 1

    def popleft(self) -> Any:
        tenant = self._turns.popleft()
        queue = self._by_tenant[tenant]
        item = queue.popleft()
        if queue:
            self._turns.append(tenant)
        else:
            del self._by_tenant[tenant]
        self._size -= 1
        return item

    def remove(self, tenant: str, item: Any) -> bool:
        queue = self._by_tenant.get(tenant)
        if queue is None:
            return False
        try:
            queue.remove(item)
        except ValueError:
            return False
        if not queue:
            del self._by_tenant[tenant]
            self._turns.remove(tenant)
        self._size -= 1
        return True


Attempt = Callable[[Subscription, Delivery], Awaitable[Outcome]]
Report = Callable[[Delivery, Outcome], None]
#: Told when an ordered delivery is to be retried in place (for counters).
Retrying = Callable[[Delivery, Outcome], None]


@dataclass
class Actor:
    """One subscriber's queue and workers."""

    subscription: Subscription
    attempt: Attempt
    report: Report
    retrying: Retrying = lambda _delivery, _outcome: None
    restart_backoff: float = 0.05
    _fifo: _Turns = field(default_factory=lambda: _Turns())  # unordered: deliveries, the tenants in turn
    _queues: dict[Hashable, deque[Delivery]] = field(default_factory=dict)  # ordered: one queue per key
    _ready: _Turns = field(default_factory=lambda: _Turns())  # ordered: keys whose head may run now
    _parked: list[tuple[float, int, Hashable]] = field(default_factory=list)  # ordered: keys backing off
    _queued: int = 0
    _waiting: int = 0  # workers waiting for work
    _closed: bool = False
    _changed: anyio.Event | None = None
    _tiebreak: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def name(self) -> str:
        return self.subscription.name

    @property
    def backlog(self) -> int:
        """Deliveries queued, parked or being handled."""
        return self._queued

    def send_nowait(self, delivery: Delivery) -> None:
        """Queue a delivery (never waits: the relay bounds what it claims, not this queue)."""
        if self._closed:
            raise anyio.ClosedResourceError
        self._queued += 1
        envelope = delivery.envelope
        if not self.subscription.ordered:
            self._fifo.append(envelope.tenant, delivery)
        else:
            key = (envelope.tenant, envelope.key if envelope.key is not None else envelope.event_id)
            queue = self._queues.get(key)
            if queue is not None:
                queue.append(delivery)  # behind the key's earlier deliveries; its key is ready, busy or parked
                return
            self._queues[key] = deque((delivery,))
            self._ready.append(envelope.tenant, key)
        if self._waiting:
            self._notify()

    def withdraw(self, delivery: Delivery) -> bool:
        """Take an unordered delivery that has not started out of the queue; return whether it was there."""
        if delivery.started or self.subscription.ordered:
            return False
        if not self._fifo.remove(delivery.envelope.tenant, delivery):
            return False
        self._queued -= 1
        return True

    def close(self) -> None:
        """Accept no more deliveries; workers take what is queued (keys backing off at once: the transport no
        longer runs attempts, see ``LocalTransport``), then :meth:`run` returns."""
        self._closed = True
        while self._parked:
            self._unpark(heapq.heappop(self._parked)[2])
        self._notify()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.subscription.concurrency):
                    tg.start_soon(self._supervise)
                task_status.started()
        finally:
            self._closed = True

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _unpark(self, key: Hashable) -> None:
        self._ready.append(key[0], key)  # type: ignore[index]  # (tenant, key)

    def _take_nowait(self) -> tuple[Hashable, Delivery] | None:
        if not self.subscription.ordered:
            return (None, self._fifo.popleft()) if self._fifo else None
        if self._parked and self._parked[0][0] <= anyio.current_time():
            now = anyio.current_time()
            while self._parked and self._parked[0][0] <= now:
                self._unpark(heapq.heappop(self._parked)[2])
        if self._ready:
            key = self._ready.popleft()
            return key, self._queues[key][0]
        return None

    def _idle(self) -> bool:
        """Closed, and nothing queued, parked or being handled."""
        return self._closed and not self._queued

    async def _take(self) -> tuple[Hashable, Delivery] | None:
        """The next delivery to handle (with its key); None once closed and nothing is left."""
        while True:
            taken = self._take_nowait()
            if taken is not None:
                return taken
            if self._idle():
                return None
            if self._changed is None:
                self._changed = anyio.Event()
            changed = self._changed
            self._waiting += 1
            try:
                if self._parked:
                    with anyio.move_on_after(max(0.0, self._parked[0][0] - anyio.current_time())):
                        await changed.wait()
                else:
                    await changed.wait()
            finally:
                self._waiting -= 1

    def _done(self, key: Hashable, *, park_until: float | None = None) -> None:
        if park_until is not None:
            heapq.heappush(self._parked, (park_until, next(self._tiebreak), key))
            self._notify()
            return
        self._queued -= 1
        if self.subscription.ordered:
            queue = self._queues[key]
            queue.popleft()
            if queue:
                self._unpark(key)
                if self._waiting:
                    self._notify()
            else:
                del self._queues[key]
        if self._idle():
            self._notify()

    async def _supervise(self) -> None:
        delay = self.restart_backoff
        while True:
            try:
                await self._work()
                return
            except Exception:
                log.exception("subscriber %s: worker crashed; restarting in %.2f s", self.name, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _work(self) -> None:
        unyielded = 0
        while True:
            # Take what is queued without a trip through the event loop, but yield now and then so that
            # handlers which never await cannot starve the relay.
            if unyielded >= _YIELD_EVERY:
                unyielded = 0
                await anyio.lowlevel.checkpoint()
            taken = self._take_nowait()
            if taken is None:
                unyielded = 0
                taken = await self._take()
                if taken is None:
                    return
            unyielded += 1
            key, delivery = taken
            delivery.started = True
            try:
                outcome = await self.attempt(self.subscription, delivery)
            except BaseException:
                # The delivery goes back to the head of the queue (of its key) for the next worker.
                if self.subscription.ordered:
                    self._ready.appendleft(key[0], key)  # type: ignore[index]
                else:
                    self._fifo.appendleft(delivery.envelope.tenant, delivery)
                raise
            if outcome.verdict is Verdict.RETRY and self.subscription.ordered:
                # An ordered subscriber retries in place: the key's later events wait, the other keys go on.
                self.retrying(delivery, outcome)
                delivery.attempt += 1
                self._done(key, park_until=anyio.current_time() + outcome.delay)
                continue
            self._done(key)
            self.report(delivery, outcome)
