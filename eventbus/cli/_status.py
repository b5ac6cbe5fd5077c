"""``eventbus status``: the outbox by status, dead letters not yet replayed, relays alive."""

from __future__ import annotations

import argparse
from datetime import datetime

from .._driver import redact_dsn
from ..relay import RelayConfig
from ._common import EXIT_OK, connected, schema_of
from ._output import Output, age, count, since

__all__ = ["cmd_status"]


def _broker(unreachable_since: datetime | None) -> str:
    return "-" if unreachable_since is None else f"unreachable {since(unreachable_since)}"


async def cmd_status(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    async with connected(args, schema) as bus:
        counts = await bus.outbox.counts()
        layout = await bus.outbox.layout()
        dead = await bus.dead_letters.count()
        relays = await bus.relays.alive(within=RelayConfig().heartbeat_interval * 3)
        dsn = redact_dsn(await bus.resolve_dsn())
    dead_rows = sorted(dead.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
    if args.json:
        out.json({
            "dsn": dsn,
            "schema": schema,
            "outbox": counts,
            "layout": layout,
            "dead_letters": [
                {"reason": reason, "subscriber": subscriber, "count": n} for (reason, subscriber), n in dead_rows
            ],
            "relays": [dict(r.items()) for r in relays],
        })  # fmt: skip
        return EXIT_OK
    out.line(f"database   {dsn}")
    out.line(f"schema     {schema}")
    oldest = counts["oldest_pending_seconds"]
    out.line(
        f"outbox     {counts['pending']} pending"
        + (f" (oldest due {age(oldest)} ago)" if oldest is not None else "")
        + f", {counts['claimed']} claimed, {counts['relayed']} relayed, {counts['dead']} dead"
    )
    if layout is not None:
        out.line(f"layout     partitioned ({layout['partitioning']}), settled partitions made up to "
                 f"{layout['settled_upto']:%Y-%m-%d %H:%M %Z}")  # fmt: skip
    out.line(f"dead       {count(sum(dead.values()), 'dead letter')} not yet replayed")
    out.line(f"relays     {len(relays)} alive")
    for r in relays:
        down = r["broker_unreachable_since"]
        if down is not None:
            out.line(f"broker     unreachable since {down:%Y-%m-%d %H:%M:%S %Z} ({since(down)}) for relay "
                     f"{r['worker']}: its rows stay pending until it answers")  # fmt: skip
    if dead_rows:
        out.line()
        out.table(
            ["reason", "subscriber", "count"],
            [(reason, subscriber or "(any)", n) for (reason, subscriber), n in dead_rows],
            title="Dead letters (see `eventbus dlq list`)",
        )
    if relays:
        out.line()
        out.table(
            ["worker", "host", "pid", "started", "last heartbeat", "partitions", "broker"],
            [
                (r["worker"], r["hostname"], r["pid"], since(r["started_at"]), since(r["heartbeat_at"]),
                 len(r["partitions"] or ()), _broker(r["broker_unreachable_since"]))
                for r in relays
            ],
            title="Relays",
        )  # fmt: skip
    elif counts["pending"] or counts["claimed"]:
        out.line()
        out.line("no relay is running on this schema: start one with `eventbus relay --app module:bus`")
    return EXIT_OK
