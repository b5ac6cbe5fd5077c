"""The ``eventbus_subscriptions`` table: the subscribers the relays carry, known to the database.

Every relay registers what it carries when it starts and refreshes it at each heartbeat. Settling an event's row
writes a targeted row for each registered subscriber of its topic that the settling relay does not carry (not
when the subscriber is retired), and claims leave rows targeted at a paused subscriber, or at one carried
elsewhere, to the relays that deliver them (both in ``queries.sql``). So a rolling deploy that adds a subscriber
to new relays loses none of its events to the old ones, and pausing a subscriber holds its deliveries back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg
import msgspec

from .. import _pool as pooled
from ..sql import Queries

__all__ = ["Carried", "SubscriberState", "SubscriptionInfo", "SubscriptionRepository"]


class SubscriberState(StrEnum):
    """Where a registered subscriber stands."""

    #: Delivered to by the relays that carry it.
    ACTIVE = "active"
    #: Its deliveries wait (nothing is dead-lettered) until it is resumed.
    PAUSED = "paused"
    #: Removed on purpose: events are no longer kept for it, its waiting rows end as ``HandlerMissing``.
    RETIRED = "retired"


class Carried(msgspec.Struct, frozen=True):
    """A subscriber as a relay registers it: its name, the topics it takes (aliases included), whether ordered."""

    name: str
    topics: tuple[str, ...]
    ordered: bool = False


@dataclass(frozen=True, slots=True)
class SubscriptionInfo:
    """A registered subscriber as ``eventbus subscribers`` shows it."""

    name: str
    topics: tuple[str, ...]
    ordered: bool
    state: SubscriberState
    registered_at: datetime
    last_seen: datetime
    state_changed: datetime | None
    #: Live relays that carry it.
    relays: tuple[str, ...]
    #: Rows waiting that are targeted at it (retries, catch-up rows, replays).
    backlog: int
    #: Age in seconds of the oldest due row it is still to receive (None: nothing waits).
    lag_seconds: float | None


_encoder = msgspec.json.Encoder()


def carried_document(carried: Sequence[Carried]) -> str:
    """What a relay carries as its heartbeat row records it: ``{"name": ["topic", ...], ...}``."""
    return _encoder.encode({sub.name: sub.topics for sub in carried}).decode()


def pairs(carried: Sequence[Carried]) -> tuple[list[str], list[str]]:
    """The (subscriber, topic) pairs of what a relay carries, as two arrays (the claim and settle parameters)."""
    names = [sub.name for sub in carried for _ in sub.topics]
    topics = [topic for sub in carried for topic in sub.topics]
    return names, topics


def _info(row: asyncpg.Record) -> SubscriptionInfo:
    return SubscriptionInfo(
        name=row["name"], topics=tuple(row["topics"]), ordered=row["ordered"], state=SubscriberState(row["state"]),
        registered_at=row["registered_at"], last_seen=row["last_seen"], state_changed=row["state_changed"],
        relays=tuple(row["relays"]), backlog=row["backlog"], lag_seconds=row["lag_seconds"],
    )  # fmt: skip


class SubscriptionRepository:
    """Registers what relays carry; lists, pauses, resumes and retires subscribers."""

    def __init__(self, pool: asyncpg.Pool, schema: str = "eventbus") -> None:
        self.pool = pool
        self.queries = Queries(schema)

    async def register(
        self, worker: str, carried: Sequence[Carried], *, live_within: float
    ) -> dict[str, tuple[SubscriberState, bool]]:
        """Register what ``worker`` carries, each subscriber with its topics and those other relays live within
        ``live_within`` seconds carry it with; return each subscriber's state and whether it had been retired."""
        document = _encoder.encode(carried).decode()
        rows = await pooled.fetch(self.pool, self.queries.subscription_register, worker, document, live_within)
        return {row["name"]: (SubscriberState(row["state"]), row["was_retired"]) for row in rows}

    async def list(self, *, live_within: float, name: str | None = None) -> list[SubscriptionInfo]:
        """Registered subscribers (or the one named), by name."""
        rows = await pooled.fetch(self.pool, self.queries.subscription_list, live_within, name)
        return [_info(row) for row in rows]

    async def states(self, names: Sequence[str]) -> dict[str, SubscriberState]:
        """The state of each registered subscriber of ``names`` (one not registered is left out)."""
        rows = await pooled.fetch(self.pool, self.queries.subscription_states, list(names))
        return {row["name"]: SubscriberState(row["state"]) for row in rows}

    async def set_state(self, name: str, state: SubscriberState) -> SubscriberState | None:
        """Give subscriber ``name`` ``state``; return its state before (None: no such subscriber, nothing set)."""
        previous = await pooled.fetchval(self.pool, self.queries.subscription_set_state, name, str(state))
        return None if previous is None else SubscriberState(previous)
