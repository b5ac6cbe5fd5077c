"""``eventbus dlq``: list, show, replay and purge dead letters."""

from __future__ import annotations

import argparse

import msgspec

from ..errors import EventBusError
from ._common import (
    EXIT_OK,
    command_hint,
    connected,
    dead_letter_filter,
    filters_given,
    letter_document,
    schema_of,
)
from ._output import Output, Progress, count, first_line, since

__all__ = ["cmd_dlq_list", "cmd_dlq_purge", "cmd_dlq_replay", "cmd_dlq_show"]


async def cmd_dlq_list(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    where = dead_letter_filter(args, include_replayed=args.all)
    async with connected(args, schema) as bus:
        letters = await bus.dead_letters.list(where, limit=args.limit + 1)
    more = len(letters) > args.limit
    letters = letters[: args.limit]
    if args.json:
        out.json({"dead_letters": [letter_document(d) for d in letters], "more": more})
        return EXIT_OK
    if not letters:
        out.line("no dead letters" + (" match these filters" if filters_given(args) else f" in schema {schema!r}"))
        return EXIT_OK
    columns = ["id", "failed", "reason", "subscriber", "topic", "key", "attempts", "error"]
    if args.all:
        columns.insert(2, "replayed")
    rows: list[list[object]] = []
    for d in letters:
        row: list[object] = [
            d.id, since(d.failed_at), d.reason, d.subscriber or "(any)", d.topic, d.key or "", d.attempts,
            first_line(d.error),
        ]  # fmt: skip
        if args.all:
            row.insert(2, f"{d.replay_count}x, {since(d.replayed_at)}" if d.replayed_at else "no")
        rows.append(row)
    out.table(columns, rows)
    if more:
        out.line(f"(showing the newest {args.limit}; more match: raise --limit or narrow with --reason, "
                 "--subscriber, --topic, --tenant, --since or --until)")  # fmt: skip
    out.line("details: " + command_hint(args, "dlq show ID", schema))
    return EXIT_OK


async def cmd_dlq_show(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    async with connected(args, schema) as bus:
        letter = await bus.dead_letters.get(args.id)
    if letter is None:
        raise EventBusError(
            f"no dead letter with id {args.id} in schema {schema!r}; list them with "
            + command_hint(args, "dlq list", schema)
        )
    if args.json:
        out.json(letter_document(letter))
        return EXIT_OK
    try:
        payload = msgspec.json.format(letter.payload, indent=2)
    except msgspec.DecodeError:
        payload = letter.payload
    fields: list[tuple[str, object]] = [
        ("id", letter.id),
        ("reason", letter.reason),
        ("subscriber", letter.subscriber or "(any: the event was not routed)"),
        ("topic", letter.topic),
        ("key", letter.key or "-"),
        ("event id", letter.event_id),
        ("outbox row", letter.outbox_id or "-"),
        ("tenant", letter.tenant or "-"),
        ("attempts", letter.attempts),
        ("failed at", f"{letter.failed_at.isoformat(timespec='seconds')} ({since(letter.failed_at)})"),
        ("replayed", f"{letter.replay_count} times, last {since(letter.replayed_at)}" if letter.replayed_at
         else "no"),
        ("error type", letter.error_type or "-"),
        ("trace id", letter.trace_id or "-"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        out.line(f"{name.ljust(width)}  {value}")
    if letter.headers:
        out.line("headers")
        for name, value in sorted(letter.headers.items()):
            out.line(f"  {name}: {value}")
    out.line("payload")
    for line in payload.splitlines():
        out.line(f"  {line}")
    out.line("error")
    for line in (letter.error or "-").splitlines():
        out.line(f"  {line}")
    if letter.traceback:
        out.line("traceback")
        for line in letter.traceback.splitlines():
            out.line(f"  {line}")
    return EXIT_OK



async def cmd_dlq_replay(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    where = dead_letter_filter(args)
    async with connected(args, schema) as bus:
        if args.dry_run:
            done = await bus.dead_letters.replay(where, ids=args.id or None, dry_run=True)
        else:
            expected = None if filters_given(args) else sum((await bus.dead_letters.count()).values())
            with Progress(out, "replaying", expected or None) as progress:
                done = await bus.dead_letters.replay(
                    where, ids=args.id or None, rate=args.rate, on_page=lambda letters: progress.advance(len(letters))
                )
    verb = "would replay" if args.dry_run else "replayed"
    targets = sorted(
        ((reason, subscriber or "(every subscriber)"), n) for (reason, subscriber), n in done.by_target.items()
    )
    if args.json:
        out.json({
            "dry_run": args.dry_run, "count": done.count,
            "by_target": [{"reason": r, "subscriber": s, "count": n} for (r, s), n in targets],
        })  # fmt: skip
        return EXIT_OK
    if not done.count:
        out.line("nothing to replay: no unreplayed dead letters match")
        return EXIT_OK
    out.table(["reason", "subscriber", "letters"], [[r, s, n] for (r, s), n in targets])
    out.line(f"{verb} {count(done.count, 'dead letter')}")
    if args.dry_run:
        out.line("nothing was written; run again without --dry-run to replay")
    else:
        out.line("each went back to its subscriber as a new outbox row; a relay delivers it with fresh attempts")
    return EXIT_OK


async def cmd_dlq_purge(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    async with connected(args, schema) as bus:
        deleted = await bus.dead_letters.purge(
            args.older_than, include_unreplayed=args.include_unreplayed, batch=args.batch
        )
    if args.json:
        out.json({"deleted": deleted})
    else:
        kind = "dead letters" if args.include_unreplayed else "replayed dead letters"
        out.line(f"deleted {deleted} {kind} older than {args.older_than}")
    return EXIT_OK
