"""A LISTEN on a bus's wake-up channel from a connection of its own, for tests of the commit notification."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg


class Listener:
    """Collects the notifications on ``channel``."""

    def __init__(self, conn: asyncpg.Connection, channel: str) -> None:
        self.conn = conn
        self.channel = channel
        self.received: list[tuple[str, str]] = []
        self.arrived = anyio.Event()

    def on_notify(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        self.received.append((channel, payload))
        self.arrived.set()

    async def settle(self) -> int:
        """Let any notification already sent arrive, then return how many arrived so far."""
        for _ in range(3):
            await self.conn.execute("SELECT 1")
            await anyio.sleep(0.1)
        return len(self.received)

    async def wait_for(self, count: int) -> int:
        """Wait (5 s at most) until ``count`` notifications arrived, then :meth:`settle`."""
        with anyio.fail_after(5):
            while len(self.received) < count:
                await self.arrived.wait()
                self.arrived = anyio.Event()
        return await self.settle()
