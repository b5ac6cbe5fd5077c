"""What observability costs: offer and burn-down with the OpenTelemetry SDK and a metric reader installed, against
the same code without an SDK (every instrument a no-op), in the same run.

The instrumented bus gets a ``MeterProvider`` whose in-memory reader is collected every second while the variants
run, as a Prometheus scrape would be (each collection runs every callback and reads every histogram). A third,
diagnostic variant adds a tracer provider that samples every span and drops it in a no-op processor (spans made,
not exported). Method as ``offer``: the variants take turns in short rounds, in a rotating order, on one schema;
a run's ratio is the median of its rounds' ratios. That is repeated over several runs (offer ratios move by
several points from one run to the next on this machine), and the printed ratio is the median of the runs'
ratios, the note giving each run's. Burn-down fills the same number of events for each variant before each of
its drains, in alternating order.
"""

from __future__ import annotations

import statistics
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import asyncpg
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from . import burndown, offer
from ._common import Outcome, Row, Settings, scratch_schema

NAME = "telemetry"
SCRAPE_EVERY = 1.0


class _Dropped(SpanProcessor):
    """Takes every finished span and keeps nothing: what making spans costs, without an exporter's."""


@asynccontextmanager
async def _providers(variant: str) -> AsyncIterator[dict[str, Any]]:
    """The bus options of a variant: nothing (no SDK), a meter provider, or both providers; while the variant
    runs, its metrics are collected every second (as a Prometheus server scraping it would)."""
    if variant == "plain":
        yield {}
        return
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    options: dict[str, Any] = {"meter_provider": provider}
    if variant == "metrics+traces":
        tracers = TracerProvider()
        tracers.add_span_processor(_Dropped())
        options["tracer_provider"] = tracers
    async with anyio.create_task_group() as tg:

        async def scrape() -> None:
            while True:
                await anyio.sleep(SCRAPE_EVERY)
                reader.get_metrics_data()

        tg.start_soon(scrape)
        yield options
        tg.cancel_scope.cancel()
    provider.shutdown()


VARIANTS = ["plain", "metrics", "metrics+traces"]


@asynccontextmanager
async def _offering(dsn: str, schema: str, connections: int, variant: str) -> AsyncIterator[offer.One]:
    async with _providers(variant) as options, offer._ours(dsn, schema, connections, **options) as one:
        yield one


async def _offer_run(settings: Settings, rounds: int, duration: float, connections: int) -> dict[str, list[float]]:
    """One run of paired offer rounds; transactions per second by variant, one figure per round."""
    by_round: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    async with scratch_schema(settings.dsn, NAME) as schema:
        conn = await asyncpg.connect(settings.dsn)
        try:
            await conn.execute(offer._ddl(schema))
        finally:
            await conn.close()
        async with AsyncExitStack() as stack:
            ones = {
                variant: await stack.enter_async_context(_offering(settings.dsn, schema, connections, variant))
                for variant in VARIANTS
            }
            for variant in VARIANTS:
                await offer._timed_loop(connections, offer.WARMUP, ones[variant])
            for round_ in range(rounds):
                turn = round_ % len(VARIANTS)
                for variant in VARIANTS[turn:] + VARIANTS[:turn]:
                    result = await offer._timed_loop(connections, duration / rounds, ones[variant])
                    by_round[variant].append(result["tx_per_s"])
    return by_round


async def _burndown_run(settings: Settings, rounds: int, count: int) -> dict[str, list[float]]:
    """One run of paired drains: events per second by variant, one figure per round."""
    by_round: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    async with scratch_schema(settings.dsn, NAME) as schema:
        for round_ in range(rounds):
            turn = round_ % len(VARIANTS)
            for variant in VARIANTS[turn:] + VARIANTS[:turn]:
                await burndown.fill(settings.dsn, schema, count)
                async with _providers(variant) as options:
                    result = await burndown.relay_drain(settings.dsn, schema, count, 500, **options)
                by_round[variant].append(result["events_per_s"])
    return by_round


def _ratio_rows(
    case: str, metric: str, unit: str, runs: list[dict[str, list[float]]], pick: Callable[[list[float]], float]
) -> list[Row]:
    rows = []
    for variant, label in (("metrics", "SDK + metric reader"), ("metrics+traces", "SDK metrics + every span")):
        per_run = [
            statistics.median(x / y for x, y in zip(run[variant], run["plain"], strict=True) if y) for run in runs
        ]
        ours = statistics.median(pick(run[variant]) for run in runs)
        base = statistics.median(pick(run["plain"]) for run in runs)
        row = Row.compare(NAME, case, f"{metric}, {label}", ours, unit, base, "same code, no SDK")
        row.ratio = statistics.median(per_run)
        row.note = (
            f"runs: {', '.join(f'{r:.3f}' for r in per_run)} (spread {max(per_run) - min(per_run):.3f})"
            + ("" if variant == "metrics" else "; diagnostic")
        )
        rows.append(row)
    return rows


async def run(settings: Settings) -> Outcome:
    runs = 3
    rounds = 8 if settings.quick else 12
    duration = 2.4 if settings.quick else 6.0
    count = 10_000 if settings.quick else 20_000
    connections = 4
    outcome = Outcome(details={"runs": runs, "rounds": rounds, "offer_seconds_per_variant": duration,
                               "burndown_events": count, "scrape_every_s": SCRAPE_EVERY})  # fmt: skip
    offers: list[dict[str, list[float]]] = []
    drains: list[dict[str, list[float]]] = []
    for number in range(runs):
        print(f"  run {number + 1} of {runs}: offer, {len(VARIANTS)} variants in {rounds} rounds ...", flush=True)
        offers.append(await _offer_run(settings, rounds, duration, connections))
        burn_rounds = max(2, rounds // 2)
        print(f"  run {number + 1} of {runs}: burn-down of {count} events, {burn_rounds} rounds ...", flush=True)
        drains.append(await _burndown_run(settings, burn_rounds, count))
    outcome.details["offer_tx_per_s_by_run"] = offers
    outcome.details["burndown_events_per_s_by_run"] = drains
    outcome.rows += _ratio_rows(f"{connections} conns", "offer", "tx/s", offers, statistics.mean)
    outcome.rows += _ratio_rows(f"{count} events", "burn-down", "ev/s", drains, statistics.mean)
    return outcome
