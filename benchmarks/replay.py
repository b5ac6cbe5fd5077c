"""How long a failing ``assert_replay_safe`` takes to report its shrunk history.

The orders example (``examples/orders``) with the handler docs/testing.md describes as failing: ``reserve_stock``
writing on a connection of its own instead of ``ctx.connection``, so a delivery that arrives twice reserves twice.
``assert_replay_safe`` runs it as ``examples/replay_test.py`` does (the same events, setup and check; 25 examples,
the default search, hypothesis's whole shrinking) until it raises; measured: the seconds to the report, the
examples run (the search's and the shrinker's), and the steps of the history reported.

Baseline, same run: one bare example of the harness (the reused schema made as new under the bus the examples
share, one event committed with no fault and drained, the check), the least any example costs. Runs: 1 (quick),
5 (full); hypothesis draws a new seed each run, so the examples it needs differ from run to run.
"""

from __future__ import annotations

import logging
import re
import statistics
from time import perf_counter
from typing import Any

import anyio
import anyio.to_thread

from eventbus import Context, EventBus
from eventbus.testing import HistoryStep, ReplayCheckFailed, _one_history, _Session, assert_replay_safe
from examples.orders import app
from examples.replay_test import orders, stock_is_conserved_and_reserved_once

from ._common import Outcome, Row, Settings

NAME = "replay"


def _failing_bus(built: list[EventBus]) -> Any:
    """The orders service's bus with ``reserve_stock`` on a connection of its own: not idempotent."""

    def factory(dsn: str, schema: str) -> EventBus:
        bus = EventBus(dsn, schema=schema)
        built.append(bus)

        async def reserve_stock(event: app.OrderPlaced, ctx: Context) -> None:
            async with bus.pool.acquire() as conn:
                reserved = await conn.fetchval(
                    "UPDATE shop_stock SET available = available - $2, reserved = reserved + $2"
                    " WHERE sku = $1 AND available >= $2 RETURNING true", event.sku, event.quantity,
                )  # fmt: skip
                await conn.execute("UPDATE shop_orders SET status = $2 WHERE id = $1", event.order_id,
                                   "reserved" if reserved else "out_of_stock")  # fmt: skip

        bus.subscribe(name="orders.reserve_stock", ordered=True, timeout=5, max_attempts=5, backoff=app.QUICK)(
            reserve_stock
        )
        bus.subscribe(name="orders.send_confirmation_email", timeout=2, max_attempts=3, backoff=app.QUICK)(
            app.send_confirmation_email
        )
        return bus

    return factory


def _failing_run(dsn: str) -> dict[str, Any]:
    built: list[EventBus] = []
    checked: list[int] = []

    async def check(conn: Any, committed: list[app.OrderPlaced]) -> None:
        checked.append(len(committed))  # once per example
        await stock_is_conserved_and_reserved_once(conn, committed)

    started = perf_counter()
    try:
        assert_replay_safe(_failing_bus(built), events=orders, setup=app.setup, check=check, dsn=dsn)
    except ReplayCheckFailed as exc:
        seconds = perf_counter() - started
        notes = "\n".join(getattr(exc, "__notes__", []))
        steps = len(re.findall(r"^\s+\d+\. publish", notes, flags=re.MULTILINE))
        return {"seconds": seconds, "examples": len(checked), "buses": len(built), "steps": steps,
                "failure": str(exc)[:200]}
    raise AssertionError("the non-idempotent handler passed: the harness found nothing")


async def _bare_examples(dsn: str, runs: int) -> list[float]:
    step = HistoryStep(app.OrderPlaced("o-1", "widget", 1, "ada@example.com"), "o-1", True)
    session = _Session(dsn, app.build_bus, app.setup, 0.2)
    times: list[float] = []
    try:
        for _ in range(runs + 1):
            started = perf_counter()
            await _one_history([step], session, stock_is_conserved_and_reserved_once)
            times.append(perf_counter() - started)
    finally:
        await session.close()
    return times[1:]  # the first one migrates the schema and starts the bus


async def run(settings: Settings) -> Outcome:
    quiet = logging.getLogger("eventbus")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # every attempt of the failing mail handler logs
    try:
        bare = statistics.median(await _bare_examples(settings.dsn, 20))
        runs = [await anyio.to_thread.run_sync(_failing_run, settings.dsn) for _ in range(1 if settings.quick else 5)]
    finally:
        quiet.setLevel(level)
    seconds = sorted(r["seconds"] for r in runs)
    per_example = statistics.median(r["seconds"] / r["examples"] for r in runs)
    label = "one bare example (reset, one event, drain, check)"
    rows = [
        Row.compare(NAME, "failing orders replay: seconds to the report (median)", "time", statistics.median(seconds),
                    "s", None, "", note=f"runs {', '.join(f'{s:.0f}' for s in seconds)} s; examples "
                    f"{', '.join(str(r['examples']) for r in runs)}; steps reported "
                    f"{', '.join(str(r['steps']) for r in runs)}; target: about 60 s"),
        Row.compare(NAME, "failing orders replay: seconds per example (median)", "time", per_example * 1000, "ms",
                    bare * 1000, label),
    ]  # fmt: skip
    return Outcome(rows=rows, details={"runs": runs, "bare_example_seconds": bare})
