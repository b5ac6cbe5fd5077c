"""The relay's settler: outcomes are written as they arrive, several to a statement.

Rows are reported one by one, whenever their subscribers are done; the settler gathers what they write and
sends it in one statement as soon as ``most`` rows are waiting, else ``every`` seconds after the first one came.
One statement runs at a time, in the order the outcomes came. A continuation row inserted as claimed is settled
only by a later statement than the one inserting it (a statement does not see its own inserts). A statement that
fails is tried again with backoff until the lease would have run out; after that the rows are left to be
reclaimed. Writes are shielded from cancellation: outcomes taken are written, or the relay says why not.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from .repositories import OutboxRepository, Settlement

__all__ = ["Settler"]

log = logging.getLogger("eventbus.relay")


class Settler:
    def __init__(
        self,
        outbox: OutboxRepository,
        worker: str,
        lease: float,
        written: Callable[[list[uuid.UUID], int], None],
        *,
        most: int = 500,
        every: float = 0.002,
    ) -> None:
        self.outbox = outbox
        self.worker = worker
        self.lease = lease
        self.most = most
        self.every = every
        #: Told the ids of the rows a statement was for, and how many of them it settled.
        self.written = written
        self.statements = 0
        self._buffers: deque[Settlement] = deque()
        self._leased_last: set[uuid.UUID] = set()  # continuations the last buffer inserts as claimed
        self._waiting = 0
        self._signal = anyio.Event()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Rows whose outcome waits to be written."""
        return self._waiting

    def add(self, settlement: Settlement) -> None:
        """Take a row's outcome (and what it writes) to be written soon."""
        if not self._buffers or any(mark[0] in self._leased_last for mark in settlement.marks):
            self._buffers.append(Settlement())
            self._leased_last = set()
        self._buffers[-1].extend(settlement)
        self._leased_last |= settlement.leased()
        self._waiting += len(settlement)
        self._signal.set()

    def close(self) -> None:
        """Write what is waiting, then let :meth:`run` return."""
        self._closed = True
        self._signal.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._buffers:
                if self._closed:
                    return
                await self._signal.wait()
                self._signal = anyio.Event()
                continue
            if self._waiting < self.most and not self._closed and len(self._buffers) == 1:
                await anyio.sleep(self.every)  # let a few more outcomes come along
            await self._write_first()

    async def flush(self) -> None:
        """Write everything waiting now (at a stop, also after the settler's task was cancelled)."""
        while self._buffers:
            await self._write_first()

    async def _write_first(self) -> None:
        settlement = self._buffers.popleft()
        if not self._buffers:
            self._leased_last = set()
        self._waiting -= len(settlement)
        ids = [mark[0] for mark in settlement.marks]
        with anyio.CancelScope(shield=True):
            deadline = anyio.current_time() + self.lease
            delay = 0.1
            while True:
                try:
                    settled = await self.outbox.settle(self.worker, settlement, lease=self.lease)
                    break
                except Exception as exc:
                    if anyio.current_time() + delay > deadline:
                        log.error("relay %s: giving up writing %d outcomes (%s); the rows will be reclaimed and "
                                  "delivered again", self.worker, len(settlement), exc)  # fmt: skip
                        settled = 0
                        break
                    log.warning("relay %s: writing outcomes failed (%s); retrying", self.worker, exc)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        self.statements += 1
        self.written(ids, settled)
