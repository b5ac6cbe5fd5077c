"""The relay's settler: outcomes are written as they arrive, several to a statement.

Rows are reported one by one, whenever their subscribers are done; the settler gathers what they write and
sends it in one statement as soon as ``most`` rows are waiting, else ``every`` seconds after the first one came.
Up to ``writers`` statements run at once, on rows no two of them share; a continuation row inserted as claimed
is settled only by a statement that starts after the one inserting it has finished (a statement does not see
its own inserts). A statement that
fails is tried again with backoff until the lease would have run out; after that the rows are left to be
reclaimed. Writes are shielded from cancellation: outcomes taken are written, or the relay says why not.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus

from .events import Envelope
from .repositories import Carried, OutboxRepository, Settlement, Status

__all__ = ["Settler"]

log = logging.getLogger("eventbus.relay")

_RELAYED = int(Status.RELAYED)
_PENDING = int(Status.PENDING)


@dataclass(slots=True, eq=False)
class _Batch:
    """Outcomes to write in one statement, once the batch it must follow (if any) is written."""

    settlement: Settlement = field(default_factory=Settlement)
    after: list[_Batch] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)


class Settler:
    def __init__(
        self,
        outbox: OutboxRepository,
        worker: str,
        lease: float,
        written: Callable[[list[uuid.UUID], int, list[float]], None],
        *,
        most: int = 500,
        every: float = 0.005,
        writers: int = 3,
    ) -> None:
        self.outbox, self.worker, self.lease, self.written = outbox, worker, lease, written
        self.most, self.every = most, every
        self.statements = 0
        #: What the relay delivers (see :meth:`OutboxRepository.settle`); None until it registered.
        self.carried: Sequence[Carried] | None = None
        self._batches: deque[_Batch] = deque()
        self._inserting: dict[uuid.UUID, _Batch] = {}  # continuations that batches not yet written insert
        self._waiting = 0
        self._signal = anyio.Event()
        self._writers = anyio.Semaphore(writers)
        self._closed = False

    @property
    def waiting(self) -> int:
        """Rows whose outcome waits to be written."""
        return self._waiting

    def add(self, settlement: Settlement) -> None:
        """Take a row's outcome (and what it writes) to be written soon."""
        batch = self._batch_for([mark[0] for mark in settlement.marks])
        batch.settlement.extend(settlement)
        if settlement.retries:
            for row_id in settlement.leased():
                self._inserting[row_id] = batch
        self._added(len(settlement))

    def add_relayed(self, row: Envelope) -> None:
        """Take a row that is relayed and writes nothing else (the common case, without a settlement of its own)."""
        batch = self._batches[-1] if self._batches and not self._inserting else self._batch_for((row.id,))
        batch.settlement.marks.append((row.id, row.attempts, _RELAYED, 0.0, None))
        self._added(1)

    def _added(self, rows: int) -> None:
        self._waiting += rows
        if not self._signal.is_set():
            self._signal.set()

    def _batch_for(self, settles: Sequence[uuid.UUID]) -> _Batch:
        """The batch to add outcomes for the rows ``settles`` to: the newest, unless a batch not yet written
        inserts one of those rows; then a new batch, written only once those are."""
        after = [self._inserting[row_id] for row_id in settles if row_id in self._inserting] if self._inserting else []
        if after or not self._batches:
            self._batches.append(_Batch(after=after))
        return self._batches[-1]

    def close(self) -> None:
        """Write what is waiting, then let :meth:`run` return."""
        self._closed = True
        self._signal.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as writing:
            task_status.started()
            while True:
                if not self._batches:
                    if self._closed:
                        return
                    await self._signal.wait()
                    self._signal = anyio.Event()
                    continue
                if self._waiting < self.most and not self._closed and len(self._batches) == 1:
                    await anyio.sleep(self.every)  # let a few more outcomes come along
                await self._writers.acquire()
                if self._batches:
                    writing.start_soon(self._write_and_release, self._take())
                else:  # a flush at a stop took them meanwhile
                    self._writers.release()

    async def flush(self) -> None:
        """Write everything waiting now (at a stop, also after the settler's task was cancelled), within one
        lease in all: what is left then goes back when its lease ends."""
        deadline = anyio.current_time() + self.lease
        while self._batches:
            await self._write(self._take(), deadline=deadline)

    def _take(self) -> _Batch:
        batch = self._batches.popleft()
        self._waiting -= len(batch.settlement)
        return batch

    async def _write_and_release(self, batch: _Batch) -> None:
        try:
            await self._write(batch)
        finally:
            self._writers.release()

    async def _write(self, batch: _Batch, *, deadline: float | None = None) -> None:
        settlement = batch.settlement
        ids = [mark[0] for mark in settlement.marks]
        settled = 0
        with anyio.CancelScope(shield=True):
            try:
                for earlier in batch.after:
                    await earlier.done.wait()
                if deadline is None:
                    deadline = anyio.current_time() + self.lease
                delay = 0.1
                while True:
                    try:
                        settled = await self.outbox.settle(
                            self.worker, settlement, lease=self.lease, carried=self.carried
                        )
                        break
                    except Exception as exc:
                        if anyio.current_time() + delay > deadline:
                            log.error("relay %s: giving up writing %d outcomes (%s); the rows will be reclaimed "
                                      "and delivered again", self.worker, len(settlement), exc)  # fmt: skip
                            break
                        log.warning("relay %s: writing outcomes failed (%s); retrying", self.worker, exc)
                        await anyio.sleep(delay)
                        delay = min(delay * 2, 2.0)
            finally:
                batch.done.set()
        for row_id in settlement.leased():
            if self._inserting.get(row_id) is batch:
                del self._inserting[row_id]
        self.statements += 1
        # Rows it sent back to pending, or cut off as targeted rows, and when (in seconds) they come due.
        delays = [mark[3] for mark in settlement.marks if mark[2] == _PENDING]
        delays += [retry[4] for retry in settlement.retries if not retry[6]]
        self.written(ids, settled, delays)
