"""Per-key order under a backlog, and subscribers that cannot hold each other up.

Each test is a scenario that broke on 0.1.0: several batches in flight pushed a key's rows into one bounded
mailbox in the wrong order; a retrying key held up the other keys of its lane; a hung subscriber held up a fast
one, because a batch settled only once every subscriber finished it; a retry's backoff ran from the settlement
of its batch instead of from the failure. The assertions are about order and about which handler ran before
which, never about how long something took (bounds only keep a broken run from hanging the suite).
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import anyio
import msgspec
import pytest

from eventbus import Backoff, Context, EventBus, RelayConfig

pytestmark = pytest.mark.anyio

GIVE_UP = 60.0  # a broken run fails instead of hanging; a working one takes a few seconds


class Step(msgspec.Struct, frozen=True):
    key: str
    n: int


class Other(msgspec.Struct, frozen=True):
    n: int


def inversions(seen: list[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(seen) if b < a)


async def publish_steps(bus: EventBus, keys: list[str], per_key: int) -> None:
    async with bus.transaction() as tx:
        for n in range(per_key):
            await tx.offer([bus.encode(Step(key, n), key=key) for key in keys])


async def test_one_key_backlog_larger_than_a_mailbox_stays_in_order(eventbus_dsn: str, eventbus_schema: str) -> None:
    config = RelayConfig(batch_size=300, poll_interval=0.05)
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=config, relay=True)
    seen: list[int] = []

    @bus.subscribe(name="ordered", ordered=True)
    async def handle(event: Step) -> None:
        seen.append(event.n)
        await anyio.sleep(0.002)

    await bus.connect()
    await publish_steps(bus, ["one"], 1000)  # a backlog before the relay starts
    async with bus:
        await bus.drain(GIVE_UP)
    assert len(seen) == 1000
    assert inversions(seen) == 0, f"{inversions(seen)} inversions, e.g. {seen[255:265]}"


async def test_many_keys_backlog_stays_in_order_per_key(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=RelayConfig(poll_interval=0.05), relay=True)
    seen: defaultdict[str, list[int]] = defaultdict(list)

    @bus.subscribe(name="ordered", ordered=True)
    async def handle(event: Step) -> None:
        seen[event.key].append(event.n)
        await anyio.sleep(0.001)

    keys = [f"k{i}" for i in range(40)]
    await bus.connect()
    await publish_steps(bus, keys, 38)  # 1,520 events
    async with bus:
        await bus.drain(GIVE_UP)
    assert sorted(seen) == sorted(keys)
    out_of_order = {key: ns for key, ns in seen.items() if ns != sorted(ns)}
    assert not out_of_order, f"{len(out_of_order)} keys out of order"
    assert all(len(ns) == 38 for ns in seen.values())


async def test_a_retrying_key_holds_up_only_itself(eventbus_dsn: str, eventbus_schema: str) -> None:
    config = RelayConfig(poll_interval=0.05)
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=config, stop_timeout=0.5)
    log: list[tuple[str, int, int]] = []
    released = anyio.Event()

    # One worker: every key shares its lane. Key "slow" fails its first event once, with a backoff that lasts
    # until the test has seen the other key through.
    @bus.subscribe(name="ordered", ordered=True, concurrency=1, backoff=Backoff(initial=GIVE_UP, jitter=0))
    async def handle(event: Step, ctx: Context) -> None:
        log.append((event.key, event.n, ctx.attempt))
        if event.key == "slow" and ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        if event.key == "fast" and event.n == 9:
            released.set()

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish(Step("slow", 0), key="slow")
            await tx.publish(Step("slow", 1), key="slow")
            for n in range(10):
                await tx.publish(Step("fast", n), key="fast")
        with anyio.fail_after(GIVE_UP / 2):
            await released.wait()
    assert [n for key, n, _ in log if key == "fast"] == list(range(10))
    # The failed key waits for its retry: its second event never ran before the first succeeded.
    assert [(n, attempt) for key, n, attempt in log if key == "slow"] == [(0, 1)]


async def test_a_hung_subscriber_does_not_hold_up_a_fast_one(eventbus_dsn: str, eventbus_schema: str) -> None:
    config = RelayConfig(batch_size=5, max_batches_in_flight=3, poll_interval=0.05)
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=config, stop_timeout=0.5)
    fast: list[int] = []
    all_fast = anyio.Event()

    @bus.subscribe(name="fast")
    async def quick(event: Other) -> None:
        fast.append(event.n)
        if len(fast) == 60:
            all_fast.set()

    @bus.subscribe(name="hung", timeout=GIVE_UP * 2)
    async def hangs(event: Other) -> None:
        await anyio.sleep_forever()

    async with bus:
        for n in range(60):
            async with bus.transaction() as tx:
                await tx.publish(Other(n))
        with anyio.fail_after(GIVE_UP / 2):
            await all_fast.wait()
    assert sorted(fast) == list(range(60))


async def test_ordered_retries_do_not_hold_up_another_subscriber(eventbus_dsn: str, eventbus_schema: str) -> None:
    # Room for three rows at a time, and three ordered events that retry in place, each in a batch of its own.
    config = RelayConfig(batch_size=1, max_batches_in_flight=3, poll_interval=0.05)
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=config)
    log: list[str] = []
    failed = anyio.Event()
    other_done = anyio.Event()

    @bus.subscribe(name="ordered", ordered=True, backoff=Backoff(initial=5.0, jitter=0), max_attempts=2)
    async def retries(event: Step, ctx: Context) -> None:
        log.append(f"ordered {event.key} attempt {ctx.attempt}")
        if sum(entry.endswith("attempt 1") for entry in log) == 3:
            failed.set()
        if ctx.attempt == 1:
            raise RuntimeError("not yet")

    @bus.subscribe(name="other")
    async def other(event: Other) -> None:
        log.append("other")
        other_done.set()

    async with bus:
        for key in ("a", "b", "c"):
            async with bus.transaction() as tx:
                await tx.publish(Step(key, 0), key=key)
        with anyio.fail_after(GIVE_UP):
            await failed.wait()
        async with bus.transaction() as tx:
            await tx.publish(Other(0))
        with anyio.fail_after(GIVE_UP):
            await other_done.wait()
        await bus.drain(GIVE_UP)
    assert log.index("other") < min(i for i, entry in enumerate(log) if entry.endswith("attempt 2")), log


async def test_a_retry_backs_off_from_its_failure(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=RelayConfig(poll_interval=0.05))
    log: list[str] = []
    slow_may_finish = anyio.Event()

    @bus.subscribe(name="flaky", backoff=Backoff(initial=0.2, jitter=0))
    async def flaky(event: Other, ctx: Context) -> None:
        log.append(f"flaky attempt {ctx.attempt}")
        if ctx.attempt == 1:
            raise RuntimeError("once")
        slow_may_finish.set()

    @bus.subscribe(name="slow", timeout=GIVE_UP * 2)
    async def slow(event: Other) -> None:
        # Finishes only once the flaky subscriber's retry ran: on 0.1.0 the retry waited for this handler, as
        # the row settled only when both were done.
        with anyio.move_on_after(GIVE_UP / 2):
            await slow_may_finish.wait()
        log.append("slow done")

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish(Other(1))
        await bus.drain(GIVE_UP)
    assert log.index("flaky attempt 2") < log.index("slow done"), log
