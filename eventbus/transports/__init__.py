"""Transports hand claimed rows to subscribers and say what became of each.

A transport is a few methods (:class:`Transport`); the relay and the bus need nothing else. ``local``
(:class:`~eventbus.transports.local.LocalTransport`, the default) runs subscriber actors in this process; a
broker transport would publish each row and report it settled once the broker acknowledged it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from anyio.abc import TaskStatus

from ..events import Envelope
from ..handlers import AttemptRunner, Subscription
from ..repositories import Carried, Reason, Settlement, Status

__all__ = ["DeliveryStatistics", "Report", "Transport", "Unrouted", "unrouted_settlement"]

#: What happens to an event no subscriber takes: a ``HandlerMissing`` dead letter, or nothing.
Unrouted = Literal["dead_letter", "drop"]

#: How a transport reports a row it is done with: the row, what settling it writes (None: the row is relayed and
#: writes nothing else, the common case), and the continuation rows that writing inserts as claimed by this relay
#: (shares still being handled here, to keep leased).
Report = Callable[[Envelope, Settlement | None, Sequence[Envelope]], None]


@dataclass(frozen=True, slots=True)
class DeliveryStatistics:
    """What a transport did since it started (this process only)."""

    delivered: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    duplicates_skipped: int = 0
    dropped: int = 0
    #: Deliveries not run because the relay lost their key partition first.
    revoked: int = 0


def unrouted_settlement(row: Envelope, unrouted: Unrouted, *, where: str = "this process") -> Settlement:
    """What settling a row no subscriber takes writes: relayed (``unrouted="drop"``, untargeted rows only), else
    a ``HandlerMissing`` dead letter, logged once the settle statement wrote it (it writes none when a subscriber
    registered elsewhere gets the event)."""
    settlement = Settlement()
    if unrouted == "drop" and row.target is None:
        settlement.mark(row, Status.RELAYED)
        return settlement
    why = (
        f"no subscriber named {row.target!r} takes topic {row.topic!r} in {where}" if row.target is not None
        else f"no subscriber for topic {row.topic!r} in {where}"
    )  # fmt: skip
    settlement.mark(row, Status.DEAD, error=why)
    settlement.dead_letter(row, Reason.HANDLER_MISSING, row.target, error_type="HandlerMissing", error=why,
                           log_when_written=True)  # fmt: skip
    return settlement


class Transport(Protocol):
    def attach(
        self, subscriptions: Sequence[Subscription], runner: AttemptRunner, *, unrouted: Unrouted,
        schema: str = "eventbus", lease: float = 30.0,
    ) -> None:  # fmt: skip
        """Take the bus's subscribers, the runner of their attempts, the bus's schema and the relay's lease;
        called once, before :meth:`run`."""

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        """Run until :meth:`close` was called and the work in hand drained (or until cancelled)."""

    async def deliver(self, rows: Sequence[Envelope], report: Report) -> None:
        """Take claimed rows, in the order they were claimed, and ``report`` each one as soon as it is done.
        Returns once the rows are taken (a row of one call never overtakes a row of an earlier call)."""

    def make_room(self) -> None:
        """The relay has no room for new rows: let go of the rows laggards hold up (see ``LocalTransport``)."""

    def full(self) -> list[str]:
        """Subscribers that have no room: rows targeted at them are not to be claimed meanwhile."""

    def blocked_topics(self) -> list[str]:
        """Topics whose untargeted rows are not to be claimed meanwhile (a subscriber of theirs has no room)."""

    def carried(self) -> Sequence[Carried]:
        """The subscribers this transport delivers to, with their topics (aliases included): what the relay
        registers (see :mod:`eventbus.repositories.subscriptions`)."""

    def revoke(self, partitions: Collection[int]) -> None:
        """The relay lost these key partitions: do not start what is waiting of their rows; report those shares
        as not run (see ``Verdict.REVOKED``)."""

    def hold(self, names: Collection[str]) -> None:
        """Deliver no new rows to these subscribers (paused): their shares go on as pending rows targeted at them."""

    def close(self) -> None:
        """Accept no more rows; :meth:`run` returns once what was accepted is done."""

    def statistics(self) -> DeliveryStatistics:
        """Counters since the transport started."""

    def unreachable_for(self) -> float | None:
        """How many seconds the broker has not answered; None while it answers (or when there is none)."""
