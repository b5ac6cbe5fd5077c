"""The conformance suite every transport passes: delivery, retries, timeouts, each dead-letter reason, the inbox's
exactly-once effect, per-key order, replay and stop. A transport is one module plus one entry in ``TRANSPORTS``:
how to make it, and how to run a bus's subscribers on it (the relay, and for a broker the consumers too)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import msgspec
import pytest

from eventbus import Backoff, Context, EventBus, LocalTransport, NewEvent, RelayConfig, Transport
from eventbus.transports.nats import NatsTransport

pytestmark = pytest.mark.anyio

GIVE_UP = 20.0


class Placed(msgspec.Struct, frozen=True):
    n: int


class Unhandled(msgspec.Struct, frozen=True):
    n: int


@asynccontextmanager
async def _local(bus: EventBus) -> AsyncIterator[None]:
    async with bus:
        yield


@asynccontextmanager
async def _broker(bus: EventBus) -> AsyncIterator[None]:
    async with bus, bus.consumer():
        yield


Running = Callable[[EventBus], AbstractAsyncContextManager[None]]


@pytest.fixture(params=["local", "nats"])
def transport(request: pytest.FixtureRequest) -> tuple[Callable[[], Transport], Running]:
    """How to make the transport, and how to run a bus's subscribers on it."""
    if request.param == "local":
        return LocalTransport, _local
    url: str = request.getfixturevalue("nats_stream")
    return (lambda: NatsTransport(url, ack_timeout=5.0)), _broker


def _bus(dsn: str, schema: str, transport: tuple[Callable[[], Transport], Running], **options: Any) -> EventBus:
    return EventBus(
        dsn, schema=schema, transport=transport[0](), stop_timeout=2.0,
        relay_config=RelayConfig(poll_interval=0.05, heartbeat_interval=0.2, lease=5.0), **options,
    )  # fmt: skip


async def _publish(
    bus: EventBus, events: list[msgspec.Struct], key: Callable[[int], str | None] = lambda i: None
) -> None:
    async with EventBus(bus.dsn, schema=bus.schema, relay=False) as producer, producer.transaction() as tx:
        await tx.offer([producer.encode(event, key=key(i)) for i, event in enumerate(events)])


async def _until(check: Callable[[], bool], what: str) -> None:
    """Wait until ``check()`` holds (it reads what handlers append: there is no event to wait on)."""
    with anyio.fail_after(GIVE_UP):
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def test_each_subscriber_gets_each_event_once(eventbus_dsn: str, eventbus_schema: str, transport: Any) -> None:
    bus = _bus(eventbus_dsn, eventbus_schema, transport)
    seen: dict[str, list[int]] = defaultdict(list)

    @bus.subscribe(name="billing", concurrency=4)
    async def billing(event: Placed) -> None:
        seen["billing"].append(event.n)

    @bus.subscribe(name="audit")
    async def audit(event: Placed, ctx: Context) -> None:
        assert ctx.topic == "Placed" and ctx.attempt == 1
        seen["audit"].append(event.n)

    async with transport[1](bus):
        await _publish(bus, [Placed(n) for n in range(30)])
        await _until(lambda: len(seen["billing"]) + len(seen["audit"]) >= 60, "every delivery")
        await bus.drain(GIVE_UP)
        await anyio.sleep(0.2)
    assert sorted(seen["billing"]) == list(range(30)) and sorted(seen["audit"]) == list(range(30))


async def test_a_failure_is_retried_with_backoff_then_handled(
    eventbus_dsn: str, eventbus_schema: str, transport: Any
) -> None:
    bus = _bus(eventbus_dsn, eventbus_schema, transport)
    attempts: list[int] = []

    @bus.subscribe(name="flaky", max_attempts=5, backoff=Backoff(initial=0.05, factor=2, jitter=0))
    async def flaky(event: Placed, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("the dependency is down")

    async with transport[1](bus):
        await _publish(bus, [Placed(1)])
        await _until(lambda: 3 in attempts, "the third attempt")
        await bus.drain(GIVE_UP)
        assert await bus.dead_letters.count() == {}
    assert attempts == [1, 2, 3]


async def test_every_dead_letter_reason(eventbus_dsn: str, eventbus_schema: str, transport: Any) -> None:
    """DeliveryFailed, HandlerTimeout, DeserializationFailed, HandlerMissing and DuplicateEvent, each for the
    right subscriber."""
    bus = _bus(eventbus_dsn, eventbus_schema, transport)

    @bus.subscribe(name="raises", max_attempts=2, backoff=0.01)
    async def raises(event: Placed) -> None:
        raise ValueError(f"cannot handle {event.n}")

    @bus.subscribe(name="hangs", timeout=0.2, max_attempts=1)
    async def hangs(event: Placed) -> None:
        await anyio.sleep(30)

    @bus.subscribe(name="effects", transactional=True)
    async def effects(event: Placed, ctx: Context) -> None:
        pass

    async with transport[1](bus):
        event_id = uuid.uuid4()
        async with EventBus(bus.dsn, schema=bus.schema, relay=False) as producer:
            async with producer.transaction() as tx:
                await tx.offer([
                    producer.encode(Placed(1)),
                    NewEvent(topic="Placed", payload=b'{"n": "not a number"}'),
                    producer.encode(Unhandled(1)),
                    NewEvent(topic="Placed", payload=b'{"n": 7}', target="effects", event_id=event_id),
                ])  # fmt: skip
            await _until_letters(bus, 6)
            async with producer.transaction() as tx:  # the same event id again, another payload
                await tx.offer([NewEvent(topic="Placed", payload=b'{"n": 8}', target="effects", event_id=event_id)])
        await _until_letters(bus, 7)
        await bus.drain(GIVE_UP)
        counts = await bus.dead_letters.count()
    assert counts == {
        ("DeliveryFailed", "raises"): 1,
        ("HandlerTimeout", "hangs"): 1,
        ("DeserializationFailed", "raises"): 1,
        ("DeserializationFailed", "hangs"): 1,
        ("DeserializationFailed", "effects"): 1,
        ("HandlerMissing", None): 1,
        ("DuplicateEvent", "effects"): 1,
    }


async def _until_letters(bus: EventBus, count: int) -> None:
    with anyio.fail_after(GIVE_UP):
        while sum((await bus.dead_letters.count()).values()) < count:  # noqa: ASYNC110 - the table is the state
            await anyio.sleep(0.05)


async def test_a_transactional_subscriber_has_one_effect_per_event(
    eventbus_dsn: str, eventbus_schema: str, transport: Any
) -> None:
    """The same event delivered twice (a redelivery, a replay of an event handled already) takes effect once."""
    bus = _bus(eventbus_dsn, eventbus_schema, transport)
    effects: list[uuid.UUID] = []

    @bus.subscribe(name="ledger", transactional=True)
    async def ledger(event: Placed, ctx: Context) -> None:
        await ctx.connection.execute("SELECT 1")
        effects.append(ctx.event_id)

    async with transport[1](bus):
        event_id = uuid.uuid4()
        again = NewEvent(topic="Placed", payload=b'{"n": 1}', target="ledger", event_id=event_id)
        async with EventBus(bus.dsn, schema=bus.schema, relay=False) as producer:
            for _ in range(3):
                async with producer.transaction() as tx:
                    await tx.offer([again])
        await bus.drain(GIVE_UP)
        await anyio.sleep(0.3)
        skipped = (
            bus.transport.statistics().duplicates_skipped
            if isinstance(bus.transport, LocalTransport) else None
        )  # fmt: skip
        assert await bus.dead_letters.count() == {}
    assert effects == [event_id]
    assert skipped in (None, 2)


async def test_an_ordered_subscriber_handles_each_key_in_event_order(
    eventbus_dsn: str, eventbus_schema: str, transport: Any
) -> None:
    bus = _bus(eventbus_dsn, eventbus_schema, transport)
    handled: dict[str, list[int]] = defaultdict(list)
    running: set[str] = set()
    overlaps = 0

    @bus.subscribe(name="ledger", ordered=True, concurrency=4, max_attempts=5, backoff=Backoff(initial=0.02, jitter=0))
    async def ledger(event: Placed, ctx: Context) -> None:
        nonlocal overlaps
        assert ctx.key is not None
        if ctx.key in running:
            overlaps += 1
        running.add(ctx.key)
        try:
            await anyio.sleep(0.002)
            if event.n % 7 == 3 and ctx.attempt == 1:
                raise RuntimeError("fails once, retried in place")
            handled[ctx.key].append(event.n)
        finally:
            running.discard(ctx.key)

    keys = [f"k{i}" for i in range(4)]
    async with transport[1](bus):
        await _publish(bus, [Placed(n) for n in range(60)], key=lambda i: keys[i % 4])
        await _until(lambda: sum(map(len, handled.values())) >= 60, "every event")
        await bus.drain(GIVE_UP)
    assert overlaps == 0
    for i, key in enumerate(keys):
        # At least once: a broker may hand an event again (an acknowledgement it did not see in time), never one
        # before an earlier event of its key.
        assert handled[key] == sorted(handled[key]), f"{key} out of order: {handled[key]}"
        assert list(dict.fromkeys(handled[key])) == list(range(i, 60, 4)), key


async def test_a_replayed_dead_letter_goes_back_to_its_subscriber_only(
    eventbus_dsn: str, eventbus_schema: str, transport: Any
) -> None:
    bus = _bus(eventbus_dsn, eventbus_schema, transport)
    fixed = False
    calls: dict[str, int] = defaultdict(int)

    @bus.subscribe(name="mailer", max_attempts=1)
    async def mailer(event: Placed) -> None:
        calls["mailer"] += 1
        if not fixed:
            raise ConnectionRefusedError("smtp down")

    @bus.subscribe(name="audit")
    async def audit(event: Placed) -> None:
        calls["audit"] += 1

    async with transport[1](bus):
        await _publish(bus, [Placed(1)])
        await _until_letters(bus, 1)
        await bus.drain(GIVE_UP)
        fixed = True
        replayed = await bus.dead_letters.replay()
        await _until(lambda: calls["mailer"] == 2, "the replay")
        await bus.drain(GIVE_UP)
        await anyio.sleep(0.2)
    assert replayed.count == 1
    assert dict(calls) == {"mailer": 2, "audit": 1}


async def test_a_stop_loses_nothing_and_runs_nothing_twice(
    eventbus_dsn: str, eventbus_schema: str, transport: Any
) -> None:
    """Events in hand at a stop, and those published while no subscriber runs, are handled by the next run."""
    handled: list[int] = []
    started = anyio.Event()

    def make() -> EventBus:
        bus = _bus(eventbus_dsn, eventbus_schema, transport)

        @bus.subscribe(name="slow", concurrency=2, transactional=True)
        async def slow(event: Placed, ctx: Context) -> None:
            started.set()
            await anyio.sleep(0.05)
            handled.append(event.n)

        return bus

    first = make()
    async with transport[1](first):
        await _publish(first, [Placed(n) for n in range(40)])
        await started.wait()
    await _publish(first, [Placed(n) for n in range(40, 50)])
    second = make()
    async with transport[1](second):
        await _until(lambda: len(set(handled)) >= 50, "every event")
        await second.drain(GIVE_UP)
        await anyio.sleep(0.2)
    assert sorted(handled) == list(range(50)), "each event handled once, across the two runs"


async def test_a_hanging_neighbour_delays_no_one_and_a_stop_past_its_timeout_loses_nothing(
    eventbus_dsn: str, eventbus_schema: str, transport: Any
) -> None:
    """A subscriber whose handler hangs holds up neither another subscriber's events nor a stop (cut short after
    ``stop_timeout``); what it had in hand is delivered again to the next run."""
    fast: list[int] = []
    hung: list[int] = []
    hang = True

    def make() -> EventBus:
        bus = _bus(eventbus_dsn, eventbus_schema, transport)

        @bus.subscribe(name="fast", concurrency=2)
        async def quick(event: Placed) -> None:
            fast.append(event.n)

        @bus.subscribe(name="hangs", concurrency=1, timeout=60.0, transactional=True)
        async def hangs(event: Placed, ctx: Context) -> None:
            if hang:
                await anyio.sleep_forever()
            hung.append(event.n)

        return bus

    first = make()
    async with transport[1](first):
        await _publish(first, [Placed(n) for n in range(20)])
        with anyio.fail_after(5):  # not GIVE_UP: the neighbour must not hold these up
            while len(set(fast)) < 20:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        stopping = anyio.current_time()
    assert anyio.current_time() - stopping < first.stop_timeout + 5.0, "the stop waited for the hung handler"
    assert hung == []
    hang = False
    second = make()
    async with transport[1](second):
        await _until(lambda: len(set(hung)) >= 20, "the hung subscriber's events, in the next run")
    assert sorted(hung) == list(range(20)), "each of the hung subscriber's events has one effect"
    assert sorted(set(fast)) == list(range(20))
