"""Transports hand claimed rows to subscribers and say what became of each.

A transport is a few methods (:class:`Transport`); the relay needs nothing else. ``local`` runs subscriber
actors in this process; a broker transport (NATS JetStream) would publish each row with its event id as the
message id and report a row settled once the broker acknowledged it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from anyio.abc import TaskStatus

from ..events import Envelope
from ..repository import Settlement

__all__ = ["Transport"]


class Transport(Protocol):
    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Run until :meth:`close` was called and in-flight work drained (or until cancelled)."""

    async def deliver(self, rows: Sequence[Envelope], settlement: Settlement) -> None:
        """Deliver claimed rows and record every row's outcome in ``settlement``."""

    def close(self) -> None:
        """Accept no more rows; :meth:`run` returns once what was accepted is done."""
