"""NATS JetStream through the command line: a relay process forwards, two consumer processes handle, and no NATS
credential is ever printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import asyncpg
import nats
import pytest
from brokered import ROOT, Order, spawn
from nats.js.api import StreamConfig

from eventbus import ConfigurationError, Context, EventBus, NatsTransport, RelayConfig
from eventbus.events import partition_of
from eventbus.sql import quote_schema
from eventbus.transports.nats import redact_nats_url, stream_name, subject_of

pytestmark = [pytest.mark.anyio, pytest.mark.subprocess]

TOKEN = "t0ken-7c1e9"




def _stop(child: subprocess.Popen[bytes]) -> int:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    return child.wait(timeout=30)


def test_nats_urls_never_show_their_credentials() -> None:
    assert redact_nats_url(f"nats://alice:{TOKEN}@h:4222") == "nats://alice:***@h:4222"
    assert redact_nats_url(f"connect to tls://{TOKEN}@h:4222, nats://h2") == "connect to tls://***@h:4222, nats://h2"
    assert redact_nats_url(f"alice:{TOKEN}@h:4222") == "alice:***@h:4222", "nats-py takes URLs without a scheme"
    assert redact_nats_url(f"nats://alice:p@ss{TOKEN}@h:4222") == "nats://alice:***@h:4222"


async def test_a_relay_and_two_consumer_processes_handle_every_event_once(
    eventbus_dsn: str, eventbus_schema: str, nats_stream: str, tmp_path: Path
) -> None:
    nats_url = nats_stream
    schema = quote_schema(eventbus_schema)
    conn = await asyncpg.connect(eventbus_dsn)
    await conn.execute(f"CREATE TABLE {schema}.effects (event_id uuid, n int, pid int)")
    await conn.execute(f"CREATE TABLE {schema}.sequence (id bigserial, key text, n int)")
    env = {**os.environ, "BROKERED_DSN": eventbus_dsn, "BROKERED_SCHEMA": eventbus_schema, "PYTHONPATH": str(ROOT)}
    # A token in the URL: the server has no authentication, so it is ignored; it must appear nowhere.
    url = nats_url.replace("nats://", f"nats://{TOKEN}@")
    logs = [tmp_path / "relay.log", tmp_path / "consumer-1.log", tmp_path / "consumer-2.log"]
    children = [spawn("relay", url, env, logs[0]), spawn("consume", url, env, logs[1]),
                spawn("consume", url, env, logs[2])]  # fmt: skip
    try:
        async with EventBus(eventbus_dsn, schema=eventbus_schema, relay=False) as producer:
            for first in range(0, 200, 50):
                async with producer.transaction() as tx:
                    await tx.publish_many([Order(n) for n in range(first, first + 50)])
            with anyio.fail_after(60):
                while await conn.fetchval(f"SELECT count(DISTINCT event_id) FROM {schema}.effects") < 200:
                    assert all(child.poll() is None for child in children), [log.read_text() for log in logs]
                    await anyio.sleep(0.1)
                while sum((await producer.dead_letters.count()).values()) < 40:  # noqa: ASYNC110 - the table is the state
                    await anyio.sleep(0.1)
            await producer.drain(30)
            letters = await producer.dead_letters.count()
            with anyio.fail_after(30):
                while await conn.fetchval(f"SELECT count(*) FROM {schema}.sequence") < 200:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
        rows = await conn.fetch(f"SELECT n, pid FROM {schema}.effects")
    finally:
        codes = [_stop(child) for child in children]
        await conn.close()
    text = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0, 0], text
    assert sorted(row["n"] for row in rows) == list(range(200)), "one effect per event"
    assert len({row["pid"] for row in rows}) == 2, "both consumers took a share"
    assert letters == {("DeliveryFailed", "rejects"): 40}
    assert TOKEN not in text, text
    assert "nats://***@127.0.0.1" in text
    started = [line for line in logs[1].read_text().splitlines() if line.startswith("consumer started")]
    assert started and "effects" in started[0] and "rejects" in started[0]


async def test_the_two_process_example_runs(eventbus_dsn: str) -> None:
    env = {**os.environ, "EVENTBUS_DSN": eventbus_dsn, "PYTHONPATH": str(ROOT)}
    env.pop("NATS_URL", None)
    try:
        done = await anyio.run_process([sys.executable, "-m", "examples.nats"], env=env, cwd=ROOT, check=False)
    finally:
        conn = await asyncpg.connect(eventbus_dsn)
        await conn.execute("DROP SCHEMA IF EXISTS nats_example CASCADE")
        await conn.close()
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, output
    assert "10 invoices written by the consumer process, one per order" in output


def test_subjects_carry_partition_and_topic_in_tokens_a_subject_can_hold() -> None:
    assert subject_of("shop", "orders.placed", None) == "eventbus.shop.u.orders.placed"
    partition = partition_of("o-1")
    assert subject_of("shop", "a..b*>", "o-1") == f"eventbus.shop.{partition}.a._.b__"


async def test_a_duplicate_window_shorter_than_the_lease_is_refused(
    eventbus_dsn: str, eventbus_schema: str, nats_stream: str
) -> None:
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, transport=NatsTransport(nats_stream, duplicate_window=20))

    @bus.subscribe(name="any")
    async def handle(event: Order) -> None:
        pass

    with pytest.raises(ConfigurationError, match="duplicate window"):
        await bus.start()
    # A stream made with a shorter window than the transport needs is refused too, saying how to fix it.
    client = await nats.connect(nats_stream)
    try:
        await client.jetstream().add_stream(
            StreamConfig(name=stream_name(eventbus_schema), subjects=[f"eventbus.{eventbus_schema}.>"],
                         duplicate_window=30)
        )  # fmt: skip
    finally:
        await client.close()
    consumer_side = EventBus(eventbus_dsn, schema=eventbus_schema, transport=NatsTransport(nats_stream))
    consumer_side.subscribe(handle)
    with pytest.raises(ConfigurationError, match="nats stream edit"):
        async with consumer_side.consumer():
            pass
    await consumer_side.close()


async def test_keys_travel_as_they_are_and_an_unforwardable_row_is_dead_lettered_alone(
    eventbus_dsn: str, eventbus_schema: str, nats_stream: str
) -> None:
    """NATS trims header values and cannot carry every header name: keys, tenants and targets are encoded, and a
    row the broker would refuse becomes one dead letter instead of a publish retried forever."""
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, transport=NatsTransport(nats_stream),
                   relay_config=RelayConfig(poll_interval=0.05), tenant=" acme\n")  # fmt: skip
    seen: list[tuple[str | None, str, int]] = []

    @bus.subscribe(name="keys", ordered=True)
    async def keys(event: Order, ctx: Context) -> None:
        seen.append((ctx.key, ctx.tenant, event.n))

    async with bus, bus.consumer():
        async with bus.transaction() as tx:
            await tx.publish(Order(1), key=" k 1\n")
            await tx.publish(Order(2), key=" k 1\n", headers={"bad name": "x"})
            await tx.publish(Order(3), key=" k 1\n")
        with anyio.fail_after(20):
            while len(seen) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.02)
        await bus.drain(20)
        letters = await bus.dead_letters.list()
    assert seen == [(" k 1\n", " acme\n", 1), (" k 1\n", " acme\n", 3)]
    assert [(d.reason, d.error_type) for d in letters] == [("DeliveryFailed", "Unforwardable")]
    assert "bad name" in (letters[0].error or "")


async def test_a_subscribers_lag_through_nats_is_its_unacknowledged_messages_and_the_oldest_ones_age(
    eventbus_dsn: str, eventbus_schema: str, nats_stream: str
) -> None:
    """``eventbus.subscriber.pending`` and ``eventbus.subscriber.lag`` of a subscriber consuming from NATS are its
    durable consumers' unacknowledged messages and the age of the oldest, read by its consumer processes."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, meter_provider=meters, stop_timeout=1,
                   transport=NatsTransport(nats_stream, metrics_interval=0.1),
                   relay_config=RelayConfig(poll_interval=0.05))  # fmt: skip
    release = anyio.Event()

    @bus.subscribe(name="slow", concurrency=1)
    async def slow(event: Order) -> None:
        await release.wait()

    def figures() -> tuple[float | None, float | None]:
        found: dict[str, float] = {}
        data = reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        attributes = dict(point.attributes)
                        if attributes.get("messaging.system") == "nats" and attributes.get(
                            "messaging.consumer.group.name") == "slow":  # fmt: skip
                            found[metric.name] = point.value  # type: ignore[union-attr]
        return found.get("eventbus.subscriber.pending"), found.get("eventbus.subscriber.lag")

    try:
        async with bus, bus.consumer():
            async with bus.transaction() as tx:
                for n in range(5):
                    await tx.publish(Order(n))
            await anyio.sleep(1.2)
            with anyio.fail_after(10):
                while (seen := figures())[0] != 5 or (seen[1] or 0) < 1.0:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            release.set()
            with anyio.fail_after(10):
                while figures() != (0, 0.0):  # noqa: ASYNC110
                    await anyio.sleep(0.1)
    finally:
        meters.shutdown()


async def test_status_says_since_when_a_relays_broker_is_unreachable_and_its_rows_stay_pending(
    eventbus_dsn: str, eventbus_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from eventbus.cli import main

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        nowhere = f"nats://user:s3cret-pw@127.0.0.1:{probe.getsockname()[1]}"
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, transport=NatsTransport(nowhere),
                   relay_config=RelayConfig(poll_interval=0.05, heartbeat_interval=0.2))  # fmt: skip

    @bus.subscribe(name="elsewhere")
    async def elsewhere(event: Order) -> None:
        raise AssertionError("consumers run elsewhere")

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish(Order(1))
        await anyio.sleep(1.0)
        common = ["--dsn", eventbus_dsn, "--schema", eventbus_schema]
        assert await anyio.to_thread.run_sync(main, ["status", *common]) == 0
        shown = capsys.readouterr().out
    assert "broker     unreachable since" in shown and "its rows stay pending" in shown
    assert "outbox     1 pending" in shown
    assert "s3cret-pw" not in shown


async def test_a_paused_subscribers_consumers_request_nothing_until_it_is_resumed(
    eventbus_dsn: str, eventbus_schema: str, nats_stream: str
) -> None:
    from eventbus import SubscriberState

    bus = EventBus(eventbus_dsn, schema=eventbus_schema, transport=NatsTransport(nats_stream),
                   relay_config=RelayConfig(poll_interval=0.05))  # fmt: skip
    seen: list[int] = []

    @bus.subscribe(name="pausable")
    async def pausable(event: Order) -> None:
        seen.append(event.n)

    async with bus:
        assert await bus.subscribers.set_state("pausable", SubscriberState.PAUSED) is SubscriberState.ACTIVE
        async with bus.consumer():
            async with bus.transaction() as tx:
                for n in range(3):
                    await tx.publish(Order(n))
            await anyio.sleep(2.0)
            assert seen == []
            await bus.subscribers.set_state("pausable", SubscriberState.ACTIVE)
            with anyio.fail_after(10):
                while len(seen) < 3:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
    assert sorted(seen) == [0, 1, 2]
