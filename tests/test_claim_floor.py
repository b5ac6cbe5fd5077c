"""Where the relay's claims start their scan: claims woken by notifications look at recent ids only, the claim
after a full batch carries on where it ended, and a claim on the poll's cadence scans from the oldest row, so a
transaction that commits long after publishing is still delivered (RelayConfig.claim_window)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from time import monotonic
from typing import Any

import anyio
import msgspec
import pytest

from eventbus import Envelope, EventBus, RelayConfig
from eventbus.ids import id_time

pytestmark = pytest.mark.anyio

WINDOW = 0.3
POLL = 1.0


class Placed(msgspec.Struct, frozen=True):
    n: int


@dataclass(frozen=True)
class Claim:
    at: float
    wall: datetime
    floor: uuid.UUID | None
    ids: tuple[uuid.UUID, ...]


def spy_on_claims(bus: EventBus) -> list[Claim]:
    """Record every claim the relay makes (the real query runs; only its arguments and results are noted)."""
    claims: list[Claim] = []
    take_pending = bus.outbox.take_pending

    async def recording(*args: Any, floor: uuid.UUID | None = None, **kwargs: Any) -> Sequence[Envelope]:
        wall = datetime.now(UTC)
        rows = await take_pending(*args, floor=floor, **kwargs)
        claims.append(Claim(monotonic(), wall, floor, tuple(row.id for row in rows)))
        return rows

    bus.outbox.take_pending = recording  # type: ignore[method-assign]
    return claims


def make_bus(dsn: str, schema: str, **config: Any) -> EventBus:
    relay = RelayConfig(poll_interval=POLL, claim_window=WINDOW, lease=5, heartbeat_interval=0.5, **config)
    return EventBus(dsn, schema=schema, relay=True, relay_config=relay)


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_a_late_commit_below_the_window_is_delivered_by_the_polls_full_scan(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    seen: list[tuple[int, float]] = []

    @bus.subscribe(name="record")
    async def record(event: Placed) -> None:
        seen.append((event.n, monotonic()))

    await bus.connect()
    claims = spy_on_claims(bus)
    async with bus:
        async with bus.transaction() as slow:
            late = await slow.publish(Placed(0))
            assert late is not None
            # While it stays open for longer than the window, other transactions commit and are delivered.
            for n in range(1, 6):
                async with bus.transaction() as tx:
                    await tx.publish(Placed(n))
                await anyio.sleep(WINDOW / 3)
            await anyio.sleep(WINDOW)
            committed = monotonic()
        await wait_for(lambda: any(n == 0 for n, _ in seen), timeout=POLL * 5)
        delivered = next(at for n, at in seen if n == 0)

    assert sorted(n for n, _ in seen) == [0, 1, 2, 3, 4, 5], "each event once"
    (finding,) = [c for c in claims if late in c.ids]
    assert finding.floor is None or finding.floor <= late, finding
    # Claims woken by notifications after the commit started above the late row: they could not see it.
    windowed = [c for c in claims if committed <= c.at <= delivered and c.floor is not None]
    assert all(c.floor is not None and c.floor > late for c in windowed), windowed
    print(f"late row delivered {delivered - committed:.3f} s after its commit; {len(windowed)} windowed claim(s) "
          f"ran in between; the one that found it started at {finding.floor}")  # fmt: skip


async def test_notified_claims_start_at_recent_ids_and_full_scans_keep_the_poll_cadence(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema)
    seen: list[int] = []

    @bus.subscribe(name="record")
    async def record(event: Placed) -> None:
        seen.append(event.n)

    await bus.connect()
    claims = spy_on_claims(bus)
    async with bus:
        started = monotonic()
        for n in range(40):
            async with bus.transaction() as tx:
                await tx.publish(Placed(n))
            await anyio.sleep(0.05)
        await wait_for(lambda: len(seen) == 40)
        ended = monotonic()

    assert sorted(seen) == list(range(40))
    full = [c for c in claims if c.floor is None]
    windowed = [c for c in claims if c.floor is not None]
    assert len(windowed) >= 20, f"{len(windowed)} claims woken by notifications of 40 commits"
    # One full scan at the start, then at most one per poll interval.
    assert len(full) <= 1 + (ended - started) / POLL + 1, [c.at - started for c in full]
    for claim in windowed:
        assert claim.floor is not None
        reach = (claim.wall - id_time(claim.floor)).total_seconds()
        assert WINDOW - 0.01 <= reach <= WINDOW + 0.5, f"a notified claim looked {reach:.3f} s back"


async def test_a_backlog_is_claimed_in_batches_that_carry_on_from_the_last_id(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = make_bus(eventbus_dsn, eventbus_schema, batch_size=100)
    seen: list[int] = []

    @bus.subscribe(name="record")
    async def record(event: Placed) -> None:
        seen.append(event.n)

    await bus.connect()
    async with bus.transaction() as tx:
        await tx.publish_many([bus.encode(Placed(n)) for n in range(1050)])
    claims = spy_on_claims(bus)
    async with bus:
        await wait_for(lambda: len(seen) == 1050)

    assert sorted(seen) == list(range(1050)), "each event once"
    batches = [c for c in claims if c.ids]
    assert [len(c.ids) for c in batches[:11]] == [100] * 10 + [50]
    assert batches[0].floor is None
    # A claim after a full batch starts where it ended, unless a rescan was due (the relay taking its
    # partitions at start asks for one).
    pairs = list(itertools.pairwise(batches[:11]))
    assert all(claim.floor in (None, max(previous.ids)) for previous, claim in pairs)
    assert sum(claim.floor == max(previous.ids) for previous, claim in pairs) >= 7, [c.floor for c in batches]
