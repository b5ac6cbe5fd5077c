"""Observability: metrics and traces of a scripted run (the SDK's in-memory reader and exporter), log records of
failures, and /metrics, /healthz and /readyz of a running relay process."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, get_current_span

from eventbus import Backoff, ConfigurationError, Context, EventBus, RelayConfig
from eventbus.cli import main
from eventbus.observability.logs import JsonFormatter
from eventbus.sql import quote_schema

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "examples" / "observability" / "grafana-dashboard.json"


class Placed(msgspec.Struct, frozen=True):
    order: str


class Shipped(msgspec.Struct, frozen=True):
    order: str


class Order(msgspec.Struct, frozen=True):
    """The topic tests/apps/observed.py handles."""

    n: int


@pytest.fixture
def telemetry() -> Iterator[tuple[MeterProvider, InMemoryMetricReader, TracerProvider, InMemorySpanExporter]]:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    exporter = InMemorySpanExporter()
    tracers = TracerProvider()
    tracers.add_span_processor(SimpleSpanProcessor(exporter))
    yield meters, reader, tracers, exporter
    meters.shutdown()
    tracers.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Every data point by instrument name: (attributes, value), a histogram's value being (count, sum)."""
    found: dict[str, list[tuple[dict[str, Any], Any]]] = defaultdict(list)
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = (point.count, point.sum) if hasattr(point, "count") else point.value
                    found[metric.name].append((dict(point.attributes), value))
    return found


def _by(points: list[tuple[dict[str, Any], Any]], *names: str) -> dict[tuple[Any, ...], Any]:
    return {tuple(attributes.get(name) for name in names): value for attributes, value in points}


def _scripted_bus(dsn: str, schema: str, **observed: Any) -> EventBus:
    bus = EventBus(
        dsn, schema=schema, stop_timeout=1,
        relay_config=RelayConfig(poll_interval=0.05, heartbeat_interval=0.2, metrics_interval=0.05), **observed,
    )  # fmt: skip

    @bus.subscribe(name="billing")
    async def billing(event: Placed, ctx: Context) -> None:
        await ctx.publish(Shipped(event.order), key=ctx.key)  # a follow-up: the trace goes on

    @bus.subscribe(name="flaky", max_attempts=3, backoff=Backoff(initial=0.05, jitter=0))
    async def flaky(event: Placed, ctx: Context) -> None:
        if ctx.attempt == 1:
            raise ConnectionResetError("the payment service hung up")

    @bus.subscribe(name="slow", timeout=0.2, max_attempts=1)
    async def slow(event: Placed) -> None:
        await anyio.sleep(5)

    @bus.subscribe(name="broken", max_attempts=1)
    async def broken(event: Placed) -> None:
        {}["missing"]  # a KeyError, as a real bug would raise

    @bus.subscribe(name="shipping")
    async def shipping(event: Shipped) -> None:
        pass

    return bus


async def test_a_scripted_run_records_every_instrument_and_one_linked_trace(
    eventbus_dsn: str, eventbus_schema: str, telemetry: Any
) -> None:
    meters, reader, tracers, exporter = telemetry
    bus = _scripted_bus(eventbus_dsn, eventbus_schema, meter_provider=meters, tracer_provider=tracers)
    async with bus:
        with tracers.get_tracer("checkout").start_as_current_span("POST /checkout") as request:
            async with bus.transaction() as tx:
                await tx.publish(Placed("o-1"), key="o-1")
        await bus.drain(timeout=20)
        with anyio.fail_after(10):  # the elected relay reads the gauges every 50 ms
            while True:
                gauges = _points(reader)
                letters = _by(gauges["eventbus.dead_letters.unreplayed"], "eventbus.dead_letter.reason")
                # A reading of the relay's taken before the drain ended can show the two letters with a retry
                # still claimed: wait for one with nothing pending or in flight.
                settled = _by(gauges["eventbus.outbox.pending"]) == _by(gauges["eventbus.outbox.in_flight"]) == {(): 0}
                if len(letters) == 2 and settled:
                    break
                await anyio.sleep(0.05)
        letters_stored = await bus.dead_letters.list()
        points = _points(reader)  # while the relay runs: a stopping relay takes its gauges with it
    trace_id = format(request.get_span_context().trace_id, "032x")
    assert "eventbus.outbox.lag" not in _points(reader) or not _points(reader)["eventbus.outbox.lag"]
    sent = _by(points["messaging.client.sent.messages"], "messaging.destination.name", "messaging.operation.name")
    assert sent == {("Placed", "publish"): 1, ("Shipped", "publish"): 1}
    consumed = _by(points["messaging.client.consumed.messages"], "messaging.consumer.group.name")
    assert consumed == {("billing",): 1, ("flaky",): 2, ("slow",): 1, ("broken",): 1, ("shipping",): 1}
    attempts = _by(points["eventbus.handler.attempts"], "messaging.consumer.group.name", "eventbus.outcome")
    assert attempts == {
        ("billing", "ok"): 1, ("flaky", "failed"): 1, ("flaky", "ok"): 1, ("slow", "timeout"): 1,
        ("broken", "failed"): 1, ("shipping", "ok"): 1,
    }  # fmt: skip
    durations = _by(
        points["messaging.process.duration"], "messaging.consumer.group.name", "eventbus.outcome", "error.type"
    )
    assert {key: count for key, (count, _) in durations.items()} == {
        ("billing", "ok", None): 1, ("flaky", "failed", "ConnectionResetError"): 1, ("flaky", "ok", None): 1,
        ("slow", "timeout", "TimeoutError"): 1, ("broken", "failed", "KeyError"): 1, ("shipping", "ok", None): 1,
    }  # fmt: skip
    assert 0.2 <= durations[("slow", "timeout", "TimeoutError")][1] < 2.0
    operations = _by(points["messaging.client.operation.duration"], "messaging.operation.name")
    assert {"offer", "claim", "settle"} <= {name for (name,) in operations}
    assert all(count >= 1 for count, _ in operations.values())
    dead = _by(points["eventbus.dead_letters"], "eventbus.dead_letter.reason", "messaging.consumer.group.name")
    assert dead == {("HandlerTimeout", "slow"): 1, ("DeliveryFailed", "broken"): 1}
    unreplayed = _by(
        points["eventbus.dead_letters.unreplayed"], "eventbus.dead_letter.reason", "messaging.consumer.group.name"
    )
    assert unreplayed == {("HandlerTimeout", "slow"): 1, ("DeliveryFailed", "broken"): 1}
    assert _by(points["eventbus.outbox.in_flight"]) == {(): 0}
    assert _by(points["eventbus.outbox.lag"]) == {(): 0.0}
    lags = _by(points["eventbus.subscriber.lag"], "messaging.consumer.group.name")
    assert set(lags) == {("billing",), ("flaky",), ("slow",), ("broken",), ("shipping",)}
    assert all(lag == 0.0 for lag in lags.values())
    waiting = _by(points["eventbus.subscriber.pending"], "messaging.consumer.group.name")
    assert waiting == {(name,): 0 for name in ("billing", "flaky", "slow", "broken", "shipping")}
    assert [value for _, value in points["eventbus.relay.partitions.owned"]] == [32]
    assert all(attributes["eventbus.schema"] == eventbus_schema for attributes, _ in points["eventbus.outbox.lag"])

    # One trace: the request → publish → each subscriber's process → the follow-up's publish → its process.
    spans: list[ReadableSpan] = list(exporter.get_finished_spans())
    assert {format(span.context.trace_id, "032x") for span in spans} == {trace_id}
    by_id = {span.context.span_id: span for span in spans}
    publish_placed = [s for s in spans if s.name == "publish Placed"]
    assert len(publish_placed) == 1 and publish_placed[0].kind is SpanKind.PRODUCER
    assert publish_placed[0].parent is not None
    assert publish_placed[0].parent.span_id == request.get_span_context().span_id
    processed = [s for s in spans if s.name == "process Placed"]
    assert Counter(s.attributes["messaging.consumer.group.name"] for s in processed) == {  # type: ignore[index]
        "billing": 1, "flaky": 2, "slow": 1, "broken": 1,
    }
    for span in processed:
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is not None and by_id[span.parent.span_id] is publish_placed[0]
        assert span.attributes is not None and span.attributes["messaging.destination.name"] == "Placed"
        assert span.attributes["messaging.system"] == "eventbus"
        assert span.attributes["messaging.operation.name"] == "process"
        assert uuid.UUID(str(span.attributes["messaging.message.id"]))
    failed = {s.attributes["messaging.consumer.group.name"]: s for s in processed  # type: ignore[index]
              if s.status.status_code is StatusCode.ERROR}  # fmt: skip
    assert set(failed) == {"flaky", "slow", "broken"}
    assert failed["broken"].attributes["error.type"] == "KeyError"  # type: ignore[index]
    assert failed["slow"].attributes["error.type"] == "TimeoutError"  # type: ignore[index]
    billing = next(s for s in processed if s.attributes["messaging.consumer.group.name"] == "billing")  # type: ignore[index]
    (publish_shipped,) = [s for s in spans if s.name == "publish Shipped"]
    assert publish_shipped.parent is not None and by_id[publish_shipped.parent.span_id] is billing
    (process_shipped,) = [s for s in spans if s.name == "process Shipped"]
    assert process_shipped.parent is not None and by_id[process_shipped.parent.span_id] is publish_shipped

    # The dead letters keep the trace, and the failing line.
    by_subscriber = {letter.subscriber: letter for letter in letters_stored}
    assert {by_subscriber["slow"].trace_id, by_subscriber["broken"].trace_id} == {trace_id}
    traceback = by_subscriber["broken"].traceback or ""
    assert "Traceback (most recent call last)" in traceback and "KeyError: 'missing'" in traceback
    assert 'test_observability.py' in traceback and '{}["missing"]' in traceback


SECRET = "s3cr3t-pw-e8f1"


async def test_failed_attempts_and_dead_letters_are_logged_with_their_fields_and_no_secret(
    eventbus_dsn: str, eventbus_schema: str, telemetry: Any, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    meters, reader, tracers, _ = telemetry
    bus = EventBus(
        eventbus_dsn, schema=eventbus_schema, tracer_provider=tracers, redact=lambda s: s.replace("TOPSECRET", "[x]"),
        relay_config=RelayConfig(poll_interval=0.05), tenant="acme", meter_provider=meters,
    )  # fmt: skip

    @bus.subscribe(name="mailer", max_attempts=2, backoff=Backoff(initial=0.01, jitter=0))
    async def mailer(event: Placed) -> None:
        raise RuntimeError(f"cannot reach postgresql://app:{SECRET}@db:5432/orders with token TOPSECRET")

    caplog.set_level(logging.INFO, logger="eventbus")
    async with bus:
        async with bus.transaction() as tx:
            event_id = await tx.publish(Placed("o-7"), key="o-7")
        await bus.drain(timeout=20)
        (letter,) = await bus.dead_letters.list()

    # The tenant is an attribute of the counters (and of nothing else).
    points = _points(reader)
    for counter in ("messaging.client.sent.messages", "messaging.client.consumed.messages", "eventbus.dead_letters"):
        assert [attributes.get("eventbus.tenant") for attributes, _ in points[counter]] == ["acme"], counter
    assert all("eventbus.tenant" not in attributes for attributes, _ in points["messaging.process.duration"])

    failures = [r for r in caplog.records if r.name == "eventbus.handlers"]
    assert [r.levelname for r in failures] == ["WARNING", "ERROR"], [r.getMessage() for r in failures]
    warning, error = failures
    for record in failures:
        assert record.subscriber == "mailer" and record.topic == "Placed"  # type: ignore[attr-defined]
        assert record.event_id == str(event_id) and record.key == "o-7"  # type: ignore[attr-defined]
        assert record.tenant == "acme" and re.fullmatch(r"[0-9a-f]{32}", record.trace_id)  # type: ignore[attr-defined]
        assert record.error_type == "RuntimeError"  # type: ignore[attr-defined]
    assert (warning.attempt, warning.max_attempts) == (1, 2)  # type: ignore[attr-defined]
    assert 0 <= warning.retry_in <= 0.011  # type: ignore[attr-defined]
    assert error.reason == "DeliveryFailed" and error.attempt == 2  # type: ignore[attr-defined]
    assert error.exc_text is not None and "Traceback (most recent call last)" in error.exc_text
    assert "raise RuntimeError" in error.exc_text
    assert letter.trace_id == error.trace_id  # type: ignore[attr-defined]
    for formatter in (logging.Formatter("%(levelname)s %(name)s %(message)s"), JsonFormatter()):
        for record in caplog.records:
            text = formatter.format(record)
            assert SECRET not in text and "TOPSECRET" not in text, text
    document = json.loads(JsonFormatter().format(error))
    assert document["level"] == "ERROR" and document["subscriber"] == "mailer" and document["attempt"] == 2
    assert "Traceback" in document["exception"]
    assert letter.traceback is not None and "[x]" in letter.traceback and SECRET not in letter.traceback

    # `eventbus dlq show` prints the traceback and the trace id.
    show = ["dlq", "show", str(letter.id), "--dsn", eventbus_dsn, "--schema", eventbus_schema]
    assert await anyio.to_thread.run_sync(main, show) == 0
    shown = capsys.readouterr().out
    assert "traceback" in shown and "raise RuntimeError" in shown and letter.trace_id in shown  # type: ignore[operator]
    assert SECRET not in shown


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:  # the test's own server, on loopback
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _dashboard_series() -> set[str]:
    """The metric names the dashboard's queries read."""
    expressions = [
        target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel.get("targets", ())
    ]
    assert expressions
    # A metric name in PromQL is followed by its label matchers or range ({...} or [...]); label names are not.
    names = {name for expr in expressions for name in re.findall(r"\b((?:eventbus|messaging)_[a-z_]+)\s*[{\[]", expr)}
    assert len(names) >= 10, names
    return names


def _spawn_relay(env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    with logs.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "eventbus.cli", "relay", "--app", "tests.apps.observed:bus", "--json",
             "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--log-format", "json"],
            env=env, stdout=subprocess.PIPE, stderr=err, cwd=ROOT,
        )  # fmt: skip


@pytest.mark.subprocess
async def test_a_running_relay_serves_metrics_health_and_json_logs(
    eventbus_dsn: str, eventbus_schema: str, tmp_path: Path
) -> None:
    env = {**os.environ, "OBSERVED_DSN": eventbus_dsn, "OBSERVED_SCHEMA": eventbus_schema, "PYTHONPATH": str(ROOT)}
    logs = tmp_path / "relay.log"
    child = _spawn_relay(env, logs)
    try:
        assert child.stdout is not None
        with anyio.fail_after(30):
            started = json.loads(await anyio.to_thread.run_sync(child.stdout.readline))
        base = started["metrics"].removesuffix("/metrics")
        async with EventBus(eventbus_dsn, schema=eventbus_schema, relay=False) as producer:
            async with producer.transaction() as tx:
                await tx.publish_many([Order(n) for n in range(10)])
            await producer.drain(timeout=20)
        with anyio.fail_after(20):
            while True:
                status, text = await anyio.to_thread.run_sync(_get, base + "/metrics")
                assert status == 200
                if 'eventbus_dead_letters_unreplayed{' in text and "eventbus_outbox_lag_seconds{" in text:
                    break
                await anyio.sleep(0.1)
        samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
        assert re.search(r'eventbus_dead_letters_total\{[^}]*eventbus_dead_letter_reason="DeliveryFailed"[^}]*\} 5\.0',
                         text), text  # fmt: skip
        assert re.search(r"eventbus_outbox_lag_seconds\{[^}]*\} 0\.0", text), text
        missing = _dashboard_series() - samples
        assert not missing, f"the dashboard reads series /metrics does not have: {sorted(missing)}"

        status, body = await anyio.to_thread.run_sync(_get, base + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = await anyio.to_thread.run_sync(_get, base + "/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["status"] == "ok", ready
        assert set(ready["checks"]) == {"database", "claiming", "leases"}
        assert (await anyio.to_thread.run_sync(_get, base + "/nothing"))[0] == 404
    finally:
        child.send_signal(signal.SIGTERM)
        code = await anyio.to_thread.run_sync(lambda: child.wait(timeout=30))
        if child.stdout is not None:
            child.stdout.close()
    assert code == 0
    records = [json.loads(line) for line in logs.read_text().splitlines() if line.strip()]
    assert any(r["logger"] == "eventbus.relay" and r["level"] == "INFO" and "started" in r["message"] for r in records)
    warnings = [r for r in records if r["level"] == "WARNING" and r["logger"] == "eventbus.handlers"]
    assert len(warnings) == 5 and all(r["subscriber"] == "receipts" and r["attempt"] == 1 for r in warnings)
    errors = [r for r in records if r["level"] == "ERROR" and r["logger"] == "eventbus.handlers"]
    assert len(errors) == 5 and all("ValueError: order" in r["exception"] for r in errors)


async def test_a_logging_setup_that_fails_costs_the_record_not_the_delivery(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """An application's record factory that sets the same fields, or a filter that raises, must not turn a
    failed attempt into a loop of crashed workers (the row was redelivered forever, never dead-lettered)."""

    class Refuses(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise RuntimeError("a broken log filter")

    previous = logging.getLogRecordFactory()

    def with_correlation(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.tenant = record.trace_id = record.key = "from-the-app"
        return record

    handlers_log = logging.getLogger("eventbus.handlers")
    refuses = Refuses()
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=RelayConfig(poll_interval=0.05))
    calls = 0

    @bus.subscribe(name="failing", max_attempts=2, backoff=Backoff(initial=0.01, jitter=0))
    async def failing(event: Placed) -> None:
        nonlocal calls
        calls += 1
        raise ValueError("fails every time")

    logging.setLogRecordFactory(with_correlation)
    handlers_log.addFilter(refuses)
    try:
        async with bus:
            async with bus.transaction() as tx:
                await tx.publish(Placed("o-9"), key="o-9")
            await bus.drain(timeout=10)
            letters = await bus.dead_letters.list()
    finally:
        handlers_log.removeFilter(refuses)
        logging.setLogRecordFactory(previous)
    assert calls == 2 and [(d.reason, d.subscriber) for d in letters] == [("DeliveryFailed", "failing")]


async def test_a_metrics_port_in_use_fails_the_start_before_anything_is_claimed(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    taken = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = taken.extra(anyio.abc.SocketAttribute.local_port)
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, metrics_port=port, metrics_host="127.0.0.1")

    @bus.subscribe(name="never")
    async def never(event: Placed) -> None:
        raise AssertionError("no relay may run")

    try:
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await bus.start()
        assert bus.relay is None or bus.relay.statistics().batches == 0
        async with EventBus(eventbus_dsn, schema=eventbus_schema, relay=False) as reader:
            assert await reader.relays.alive(within=60) == []
    finally:
        await taken.aclose()
    with pytest.raises(ConfigurationError):
        EventBus(eventbus_dsn, metrics_port=70000)


async def test_rows_of_a_paused_subscriber_are_its_lag_not_the_outboxs(eventbus_dsn: str, eventbus_schema: str) -> None:
    async with EventBus(eventbus_dsn, schema=eventbus_schema, relay=False) as bus:
        schema = quote_schema(eventbus_schema)
        await bus.pool.execute(
            f"INSERT INTO {schema}.eventbus_subscriptions (name, topics, state) "
            "VALUES ('paused-one', '{Placed}', 'paused'), ('active-one', '{Placed}', 'active')"
        )
        await bus.pool.execute(
            f"INSERT INTO {schema}.eventbus_outbox (id, event_id, topic, target, payload, available_at) "
            "VALUES ($1, $1, 'Placed', 'paused-one', '{}', now() - interval '10 minutes')", uuid.uuid4()
        )
        gauges = await bus.relays.gauges()
        assert gauges.pending == 1 and gauges.lag == 0.0
        assert gauges.subscribers["paused-one"][0] == 1 and gauges.subscribers["paused-one"][1] > 590
        assert gauges.subscribers["active-one"] == (0, 0.0)
        await bus.pool.execute(
            f"INSERT INTO {schema}.eventbus_outbox (id, event_id, topic, payload, available_at) "
            "VALUES ($1, $1, 'Placed', '{}', now() - interval '1 minute')", uuid.uuid4()
        )
        gauges = await bus.relays.gauges()
        assert gauges.pending == 2 and 59 < gauges.lag < 120
        assert gauges.subscribers["active-one"][0] == 1


async def test_spans_continue_in_def_handlers_and_a_failed_publish_is_redacted(
    eventbus_dsn: str, eventbus_schema: str, telemetry: Any
) -> None:
    _, _, tracers, exporter = telemetry
    bus = EventBus(
        eventbus_dsn, schema=eventbus_schema, tracer_provider=tracers, redact=lambda s: s.replace("s3cret", "[x]"),
        relay_config=RelayConfig(poll_interval=0.05),
    )  # fmt: skip
    seen: list[str] = []

    @bus.subscribe(name="threaded")
    def threaded(event: Placed) -> None:
        seen.append(format(get_current_span().get_span_context().trace_id, "032x"))

    async with bus:
        async with bus.transaction() as tx:
            await tx.publish(Placed("o-1"))
        await bus.drain(timeout=10)
        schema = quote_schema(eventbus_schema)
        await bus.pool.execute(
            f"CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'insert refused, token s3cret'; END $$;"
            f"CREATE TRIGGER refuse BEFORE INSERT ON {schema}.eventbus_outbox FOR EACH ROW EXECUTE FUNCTION "
            f"{schema}.refuse()"
        )
        with pytest.raises(Exception, match="s3cret"):
            async with bus.transaction() as tx:
                await tx.publish(Placed("o-2"))
    (published, refused) = [s for s in exporter.get_finished_spans() if s.name == "publish Placed"]
    assert seen == [format(published.context.trace_id, "032x")]
    assert refused.status.status_code is StatusCode.ERROR
    assert "[x]" in (refused.status.description or "") and "s3cret" not in (refused.status.description or "")
    assert not refused.events, "no exception event: it would carry the text unredacted"
