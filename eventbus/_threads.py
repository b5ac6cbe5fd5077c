"""Threads for plain ``def`` handlers: one small pool of daemon threads per subscriber.

A thread cannot be interrupted. When a ``def`` handler outlives its timeout the attempt fails and the thread is
abandoned: it finishes on its own, counted in :attr:`ThreadPools.abandoned` and logged. Its thread stays taken
until then, so a pool never grows past its size (twice the subscriber's concurrency: room for as many hung
threads as running ones) and one subscriber's hung handlers never take another's threads. The threads are
daemons, so a hung handler never keeps the process from exiting.

Written here rather than with ``anyio.to_thread`` or ``concurrent.futures``: both use non-daemon threads that
the interpreter waits for at exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import anyio

__all__ = ["ThreadPools"]

log = logging.getLogger("eventbus.threads")

class _Item:
    """One call for a pool's threads, and what became of it."""

    __slots__ = ("args", "context", "dropped", "fn", "future", "loop", "started")

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:  # fmt: skip
        self.fn, self.args, self.loop, self.future = fn, args, loop, future
        # The submitting task's context variables (its current span among them), for the handler's thread.
        self.context = contextvars.copy_context()
        self.started = False
        self.dropped = False  # its attempt ended (timed out) before a thread took it: never run it

    def run(self) -> None:
        try:
            result = self.context.run(self.fn, *self.args)
        except BaseException as exc:  # handed to the awaiting task, which decides what it means
            self._settle(None, exc)
        else:
            self._settle(result, None)

    def _settle(self, result: Any, exc: BaseException | None) -> None:
        future = self.future

        def settle() -> None:
            if future.done():
                return  # abandoned: its attempt timed out already
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(settle)


class _Pool:
    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.abandoned = 0
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0  # threads waiting for work
        self._lock = threading.Lock()

    def submit(self, item: _Item) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif self._threads < self.size:
                self._threads += 1
                name = f"eventbus-{self.name}-{self._threads}"
                threading.Thread(target=self._serve, name=name, daemon=True).start()
            # else: every thread is busy (some maybe hung); the item waits for one
        self._work.put(item)

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            if not item.dropped:
                item.started = True
                item.run()
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        with self._lock:
            threads = self._threads
        for _ in range(threads):
            self._work.put(None)


class ThreadPools:
    """The thread pools of a bus's ``def`` handlers, one per subscriber."""

    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}
        #: Threads left running past their handler's timeout (since the bus started).
        self.abandoned = 0

    async def run(self, subscriber: str, concurrency: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on one of ``subscriber``'s threads; if cancelled (a timeout), abandon the thread."""
        pool = self._pools.get(subscriber)
        if pool is None:
            pool = self._pools[subscriber] = _Pool(subscriber, 2 * concurrency)
        loop = asyncio.get_running_loop()
        item = _Item(fn, args, loop, loop.create_future())
        pool.submit(item)
        try:
            # Shielded: a cancelled task would cancel the future it awaits, and so hide whether the thread is done.
            return await asyncio.shield(item.future)
        except anyio.get_cancelled_exc_class():
            item.dropped = True
            if item.started and not item.future.done():
                item.future.cancel()
                pool.abandoned += 1
                self.abandoned += 1
                log.warning(
                    "subscriber %s: a def handler outlived its timeout; its thread is abandoned and finishes on its "
                    "own (%d abandoned so far)", subscriber, pool.abandoned,
                )  # fmt: skip
            raise

    def close(self) -> None:
        """Let idle threads end (busy ones end when their handler returns; all are daemons)."""
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
