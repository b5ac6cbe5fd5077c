"""Relay wake-ups for committed bus transactions, coalesced across the process's transactions.

A wake-up is a NOTIFY, and a notification costs the server a transaction of its own (an xid and a commit
record); one per producer transaction costs producers a measurable share of their transactions/s
(BENCHMARKS.md). So a started bus sends at most one per ``spacing`` seconds:

- a COMMIT message of :meth:`EventBus.transaction` carries a wake-up, after the COMMIT, when none left in the
  last ``spacing`` seconds (see :mod:`eventbus._pool`);
- a COMMIT that carried none leaves a wake-up *owed*; the next COMMIT after the spacing carries it, and when
  none has within two spacings of the last wake-up, the waker sends it from a connection of its own. (Sent as
  soon as the spacing ended, the waker would race the COMMITs and send about half the wake-ups itself; a
  wake-up the waker sends costs a task switch and a round trip in this process, one a COMMIT carries neither.)

A wake-up covers every COMMIT that returned before it left, so each committed row is followed by one within
about two spacings. It is a hint: relays also poll. A failure to send one is logged, retried each second, and
costs latency, never an event. Without a running waker (a bus that was only connected, or one stopping), every
COMMIT carries a wake-up.
"""

from __future__ import annotations

import logging
from time import monotonic

import anyio
import asyncpg
from anyio.abc import TaskStatus

__all__ = ["Waker"]

log = logging.getLogger("eventbus.waker")

_SEND_TIMEOUT = 5.0
_RETRY_AFTER = 1.0


class Waker:
    """Decides which COMMIT carries the wake-up on ``channel`` and sends the ones no COMMIT carried."""

    def __init__(self, channel: str, query: str, *, spacing: float = 0.002) -> None:
        self.channel = channel
        self.query = query
        self.spacing = spacing
        #: Wake-ups carried by COMMIT messages, and sent by the waker itself.
        self.carried = 0
        self.sent = 0
        self._last = float("-inf")
        self._uncovered = False
        self._running = False
        self._stopping = False
        self._stop_asked = anyio.Event()
        self._stopped = anyio.Event()
        self._signal = anyio.Event()
        self._connection: asyncpg.Connection | None = None
        self._failing = False

    @property
    def running(self) -> bool:
        return self._running and not self._stopping

    def carry_nowait(self) -> bool:
        """Called right before a COMMIT message is sent: whether it should carry a wake-up."""
        if self.running:
            now = monotonic()
            if now - self._last < self.spacing:
                return False
            self._last, self._uncovered = now, False
        self.carried += 1
        return True

    @property
    def owed(self) -> bool:
        """Whether a COMMIT has returned since the last wake-up left."""
        return self._uncovered

    def owe_nowait(self) -> None:
        """A wake-up is owed: a COMMIT returned without carrying one, or its outcome is unknown."""
        self._uncovered = True
        self._signal.set()

    def stop(self) -> None:
        """Send what is owed, then let :meth:`run` return."""
        self._stopping = True
        self._stop_asked.set()
        self._signal.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def run(self, dsn: str, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            while True:
                if not (self._uncovered or self._stopping):
                    await self._signal.wait()
                self._signal = anyio.Event()
                if not self._uncovered:
                    if self._stopping:
                        return
                    continue  # a COMMIT carried it
                # A COMMIT may carry it meanwhile: they get one spacing more than themselves to do it.
                delay = self._last + 2 * self.spacing - monotonic()
                if delay > 0 and not self._stopping:
                    await self._pause(delay)
                    continue
                self._last, self._uncovered = monotonic(), False
                if not await self._send(dsn):
                    self._uncovered = True
                    if self._stopping:
                        return
                    await self._pause(_RETRY_AFTER)
        finally:
            self._running = False
            if self._connection is not None:
                self._connection.terminate()
                self._connection = None
            self._stopped.set()

    async def _pause(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._stop_asked.wait()

    async def _send(self, dsn: str) -> bool:
        # A connection the server has since closed fails once; a fresh one is tried at once.
        for _attempt in range(2):
            try:
                with anyio.fail_after(_SEND_TIMEOUT):
                    if self._connection is None:
                        # Asynchronous commit: a notification is nothing to keep, so no WAL flush is waited for.
                        self._connection = await asyncpg.connect(
                            dsn, server_settings={"synchronous_commit": "off", "application_name": "eventbus waker"}
                        )
                    await self._connection.execute(self.query, self.channel)
            except (
                OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError,  # what a statement raises as the server's termination notice arrives
            ) as exc:  # fmt: skip
                error = exc
                if self._connection is not None:
                    self._connection.terminate()
                    self._connection = None
                continue
            if self._failing:
                log.info("relay wake-ups are sent again")
            self._failing = False
            self.sent += 1
            return True
        if not self._failing:
            log.warning("could not wake relays (%s); trying again in %g s, and relays poll meanwhile", error,
                        _RETRY_AFTER)  # fmt: skip
        self._failing = True
        return False
