"""Subscriptions known to the database: rolling deploys, subscribers running elsewhere, pause, resume, retire,
renamed topics.

Each relay registers the subscribers it carries. On 0.2.0 before this, routes came from the relay's own process
alone: an old relay marked an event relayed although a subscriber deployed on the new relays should have had it
too, and an event of a topic only another process handled became a ``HandlerMissing`` dead letter. Several buses
on one schema play the relays of a deploy; a stopped bus is a relay not running at that moment.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import anyio
import msgspec
import pytest

from eventbus import EventBus, RelayConfig, SubscriberState, topic
from eventbus.cli import main

pytestmark = pytest.mark.anyio

GIVE_UP = 30.0
FAST = RelayConfig(poll_interval=0.05, heartbeat_interval=0.2)


@topic("orders.placed")
class OrderPlaced(msgspec.Struct, frozen=True):
    n: int


@topic("invoices.sent")
class InvoiceSent(msgspec.Struct, frozen=True):
    n: int


def relay_bus(dsn: str, schema: str) -> EventBus:
    return EventBus(dsn, schema=schema, relay_config=FAST, relay=True)


def carry_audit(bus: EventBus) -> None:
    """Give ``bus`` a subscriber ``audit`` of ``orders.placed`` that does nothing."""

    @bus.subscribe(name="audit")
    async def audit(event: OrderPlaced) -> None:
        pass


async def publish(bus: EventBus, events: list[msgspec.Struct], *, keyed: bool = True) -> None:
    async with bus.transaction() as tx:
        await tx.offer([bus.encode(e, key=f"k{i % 5}" if keyed else None) for i, e in enumerate(events)])


async def waiting_for(bus: EventBus, name: str) -> int:
    (info,) = await bus.subscribers.list(live_within=10.0, name=name)
    return info.backlog


async def only_waiting_for(bus: EventBus, name: str, rows: int) -> None:
    """Wait until the only rows left pending or claimed are ``rows`` rows targeted at subscriber ``name``."""
    with anyio.fail_after(GIVE_UP):
        while not (await waiting_for(bus, name) == rows and await bus.outbox.unsettled() == rows):  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def test_an_old_relay_leaves_a_new_subscribers_share_for_a_new_relay(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """A rolling deploy adds ``mailer``: the old relay handles every event while the new one is down, and the
    new one delivers each of them to ``mailer`` once it runs (0.2.0 before: ``mailer`` got none)."""
    audit: Counter[int] = Counter()
    mailer: Counter[int] = Counter()
    old, new = relay_bus(eventbus_dsn, eventbus_schema), relay_bus(eventbus_dsn, eventbus_schema)

    @old.subscribe(name="audit")
    async def audit_old(event: OrderPlaced) -> None:
        audit[event.n] += 1

    @new.subscribe(name="audit")
    async def audit_new(event: OrderPlaced) -> None:
        audit[event.n] += 1

    @new.subscribe(name="mailer", ordered=True)
    async def mail(event: OrderPlaced) -> None:
        mailer[event.n] += 1

    async with new:  # the first new relay starts (registering mailer) and is stopped again
        pass
    async with old:
        await publish(old, [OrderPlaced(n) for n in range(40)])
        await publish(old, [OrderPlaced(n) for n in range(40, 60)], keyed=False)
        await only_waiting_for(old, "mailer", 60)  # settled for audit; mailer's shares wait for a relay with it
    assert audit == Counter(range(60)) and not mailer
    async with new:
        await new.drain(GIVE_UP)
        assert await new.dead_letters.count() == {}
    assert mailer == Counter(range(60)), "each event reached the new subscriber once"
    assert audit == Counter(range(60)), "and the old one only once"


async def test_an_event_only_another_process_handles_is_not_a_dead_letter(
    eventbus_dsn: str, eventbus_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay that knows neither the topic nor its subscriber hands the event on to the registered subscriber
    (0.2.0 before: a ``HandlerMissing`` dead letter), and logs no dead letter for it."""
    caplog.set_level(logging.INFO, logger="eventbus")
    billing: list[int] = []
    here, elsewhere = relay_bus(eventbus_dsn, eventbus_schema), relay_bus(eventbus_dsn, eventbus_schema)

    carry_audit(here)

    @elsewhere.subscribe(name="billing")
    async def bill(event: InvoiceSent) -> None:
        billing.append(event.n)

    async with elsewhere:
        pass
    async with here:
        await publish(here, [InvoiceSent(n) for n in range(5)])
        await only_waiting_for(here, "billing", 5)
        assert await here.dead_letters.count() == {}
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    async with elsewhere:
        await elsewhere.drain(GIVE_UP)
    assert billing == list(range(5))


async def test_a_topic_no_registered_subscriber_takes_is_still_a_dead_letter(
    eventbus_dsn: str, eventbus_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    bus = relay_bus(eventbus_dsn, eventbus_schema)

    carry_audit(bus)

    caplog.set_level(logging.INFO, logger="eventbus")
    async with bus:
        await publish(bus, [InvoiceSent(1)])
        await bus.drain(GIVE_UP)
        assert await bus.dead_letters.count() == {("HandlerMissing", None): 1}
    (logged,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged.reason == "HandlerMissing" and logged.topic == "invoices.sent"  # type: ignore[attr-defined]


async def test_a_paused_subscriber_waits_and_resumes_in_order(eventbus_dsn: str, eventbus_schema: str) -> None:
    bus = relay_bus(eventbus_dsn, eventbus_schema)
    mailer: list[int] = []
    audit: list[int] = []

    @bus.subscribe(name="mailer", ordered=True)
    async def mail(event: OrderPlaced) -> None:
        mailer.append(event.n)

    @bus.subscribe(name="audit")
    async def record(event: OrderPlaced) -> None:
        audit.append(event.n)

    async with bus:
        assert await bus.subscribers.set_state("mailer", SubscriberState.PAUSED) == SubscriberState.ACTIVE
        await anyio.sleep(FAST.heartbeat_interval * 3)  # the relay learns it at its next heartbeat
        await publish(bus, [OrderPlaced(n) for n in range(30)], keyed=False)
        await only_waiting_for(bus, "mailer", 30)
        assert sorted(audit) == list(range(30)), "the other subscriber is not held up"
        assert mailer == [] and await bus.dead_letters.count() == {}
        assert await bus.subscribers.set_state("mailer", SubscriberState.ACTIVE) == SubscriberState.PAUSED
        await bus.drain(GIVE_UP)
    assert mailer == list(range(30)), "every held event, once, in event id order"


async def test_a_retired_subscribers_waiting_rows_end_as_handler_missing(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """Retired on purpose: its events are no longer kept, and what already waited for it is dead-lettered."""
    here, gone = relay_bus(eventbus_dsn, eventbus_schema), relay_bus(eventbus_dsn, eventbus_schema)

    carry_audit(here)

    @gone.subscribe(name="legacy")
    async def legacy(event: OrderPlaced) -> None:
        raise AssertionError("a retired subscriber is not delivered to")

    async with gone:
        pass
    async with here:
        await publish(here, [OrderPlaced(n) for n in range(4)])
        await only_waiting_for(here, "legacy", 4)
        assert await here.subscribers.set_state("legacy", SubscriberState.RETIRED) == SubscriberState.ACTIVE
        await here.drain(GIVE_UP)
        assert await here.dead_letters.count() == {("HandlerMissing", "legacy"): 4}
        await publish(here, [OrderPlaced(n) for n in range(4, 8)])
        await here.drain(GIVE_UP)
        assert await here.dead_letters.count() == {("HandlerMissing", "legacy"): 4}, "nothing kept for it any more"


async def test_a_subscribers_topics_are_those_every_live_relay_declares(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """A rollout adds a topic to a subscriber: an old relay that starts while a new one runs does not take the new
    topic away (which would lose its events settled by old relays); once the last relay declaring it is gone, it
    is dropped."""
    old, new = relay_bus(eventbus_dsn, eventbus_schema), relay_bus(eventbus_dsn, eventbus_schema)

    @old.subscribe(name="books")
    async def books_old(event: OrderPlaced) -> None:
        pass

    @new.subscribe(name="books")
    async def books_new(event: OrderPlaced | InvoiceSent) -> None:
        pass

    async def topics(bus: EventBus) -> tuple[str, ...]:
        (info,) = await bus.subscribers.list(live_within=10.0, name="books")
        return info.topics

    async with new:
        assert await topics(new) == ("invoices.sent", "orders.placed")
        with anyio.fail_after(GIVE_UP):  # the new relay's heartbeat records what it carries
            while not (await new.subscribers.list(live_within=10.0))[0].relays:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        async with old:
            assert await topics(old) == ("invoices.sent", "orders.placed"), "the old relay kept the new topic"
            await anyio.sleep(FAST.heartbeat_interval * 3)
            assert await topics(old) == ("invoices.sent", "orders.placed")
            await new.stop()
            with anyio.fail_after(GIVE_UP):
                while await topics(old) != ("orders.placed",):  # noqa: ASYNC110
                    await anyio.sleep(0.05)


@topic("orders.created", aliases=["orders.placed"])
class OrderCreated(msgspec.Struct, frozen=True):
    n: int


async def test_a_renamed_topic_still_takes_rows_stored_under_its_former_name(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    before = EventBus(eventbus_dsn, schema=eventbus_schema)
    await before.connect()
    await publish(before, [OrderPlaced(n) for n in range(3)])  # stored as orders.placed
    await before.close()
    after = relay_bus(eventbus_dsn, eventbus_schema)
    seen: list[tuple[str, int]] = []

    @after.subscribe(name="audit", ordered=True)
    async def audit(event: OrderCreated, ctx: object) -> None:
        seen.append((type(event).__name__, event.n))

    async with after:
        await publish(after, [OrderCreated(3)])
        await after.drain(GIVE_UP)
        assert after.encode(OrderCreated(9)).topic == "orders.created", "new events take the new name"
        assert await after.dead_letters.count() == {}
    assert seen == [("OrderCreated", n) for n in range(4)]


async def test_cli_lists_pauses_resumes_and_retires_subscribers(
    eventbus_dsn: str, eventbus_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--dsn", eventbus_dsn, "--schema", eventbus_schema]
    bus = relay_bus(eventbus_dsn, eventbus_schema)

    @bus.subscribe(name="mailer")
    async def mail(event: OrderPlaced) -> None:
        pass

    async with bus:

        def run(*argv: str) -> tuple[int, dict[str, object]]:
            code = main([*argv, "--json", *common])
            return code, json.loads(capsys.readouterr().out)

        with anyio.fail_after(GIVE_UP):  # the relay's first heartbeat records what it carries
            while not (await bus.subscribers.list(live_within=10.0))[0].relays:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        code, listed = await anyio.to_thread.run_sync(run, "subscribers")
        assert code == 0
        (mailer,) = listed["subscribers"]  # type: ignore[misc]
        assert mailer["name"] == "mailer" and mailer["state"] == "active" and mailer["topics"] == ["orders.placed"]
        assert bus.relay is not None and mailer["relays"] == [bus.relay.worker]
        assert await anyio.to_thread.run_sync(run, "subscribers", "pause", "mailer") == (
            0, {"name": "mailer", "state": "paused", "previous": "active"}
        )  # fmt: skip
        assert (await anyio.to_thread.run_sync(run, "subscribers", "resume", "mailer"))[1]["state"] == "active"
        code, refused = await anyio.to_thread.run_sync(run, "subscribers", "retire", "mailer")
        assert code == 1 and "live relay" in refused["error"]["message"]  # type: ignore[index]
        code, unknown = await anyio.to_thread.run_sync(run, "subscribers", "pause", "mailr")
        assert code == 1 and "registered: mailer" in unknown["error"]["message"]  # type: ignore[index]
        assert (await anyio.to_thread.run_sync(run, "subscribers", "retire", "mailer", "--force"))[0] == 0
