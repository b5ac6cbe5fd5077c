"""The ``eventbus`` command: apply migrations, look at the outbox and the dead letters, run a relay, try a demo.

Every command talks to the database through the repositories (no SQL here). Tables use ``rich`` when it is
installed (``pip install 'eventbus[cli]'``) and plain text otherwise; ``--json`` prints machine-readable output.
Errors print one line saying what went wrong and what to do; the exit code says what kind of error it was.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import logging
import os
import signal
import sys
import traceback
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import anyio
import asyncpg
import msgspec

from .bus import EventBus, _redacted
from .errors import ConfigurationError, DatabaseUnavailable, EventBusError, MigrationsMissing
from .events import topic
from .handlers import Backoff, Context
from .migrations import migrate
from .relay import RelayConfig
from .repository import DeadLetter, DeadLetterFilter, Reason
from .sql import migrations, quote_schema

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_MIGRATIONS = 4

DEFAULT_SCHEMA = "eventbus"
DEMO_SCHEMA = "eventbus_demo"



# -- output --------------------------------------------------------------------------------------------------


class Output:
    """Prints lines, tables (with rich when installed) and JSON documents."""

    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json
        self._console: Any = None
        self._rich_checked = False

    def line(self, text: str = "") -> None:
        print(text, flush=True)

    def json(self, document: Any, *, compact: bool = False) -> None:
        encoded = msgspec.json.encode(document)
        print((encoded if compact else msgspec.json.format(encoded, indent=2)).decode(), flush=True)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None) -> None:
        cells = [["" if value is None else str(value) for value in row] for row in rows]
        widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(columns)]
        console = self._rich()
        # rich only when the table fits: cells stay whole (people copy ids) and only the last column wraps.
        if console is not None and sum(widths[:-1]) + min(widths[-1], 20) + 3 * len(columns) <= console.width:
            from rich import box
            from rich.table import Table
            from rich.text import Text

            table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
            for name, width in zip(columns[:-1], widths, strict=False):
                table.add_column(name, no_wrap=True, min_width=width)
            table.add_column(columns[-1], overflow="fold", ratio=1)
            for row in cells:
                table.add_row(*(Text(value) for value in row))  # Text: no markup from stored data
            console.print(table)
            return
        if title:
            self.line(title)
        self.line("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        self.line("  ".join("-" * w for w in widths))
        for row in cells:
            self.line("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())

    def _rich(self) -> Any:
        """A rich console for a terminal, else None: piped output stays plain, one row per line."""
        if not self._rich_checked:
            self._rich_checked = True
            if not sys.stdout.isatty():
                return None
            try:
                from rich.console import Console
            except ImportError:
                print("(tip: pip install 'eventbus[cli]' for nicer tables)", file=sys.stderr)
            else:
                self._console = Console(highlight=False)
        return self._console


# -- helpers -------------------------------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    """A duration in words a person reads at a glance: ``4.2 s``, ``3 min 10 s``, ``2 h 5 min``, ``3 d 4 h``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _since(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return _age((datetime.now(UTC) - moment).total_seconds()) + " ago"


def _first_line(text: str | None, width: int = 60) -> str:
    lines = (text or "").strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _reason(value: str) -> str:
    """argparse type for ``--reason``: a reason name in any case, with or without underscores."""
    wanted = value.replace("_", "").replace("-", "").lower()
    for reason in Reason:
        if reason.value.lower() == wanted:
            return reason.value
    raise argparse.ArgumentTypeError(f"unknown reason {value!r}; use one of {', '.join(r.value for r in Reason)}")


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _dead_letter_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a dead-letter id (a UUID, as printed by `eventbus dlq list`)"
        ) from None


def _schema(args: argparse.Namespace, default: str = DEFAULT_SCHEMA) -> str:
    return str(args.schema) if args.schema else default


def _bus(args: argparse.Namespace, *, schema: str, migrate: bool = False, **options: Any) -> EventBus:
    return EventBus(args.dsn, schema=schema, migrate=migrate, **options)


async def _connect(bus: EventBus) -> None:
    """Open the bus's pool (checking migrations), turning a malformed DSN into a configuration error."""
    try:
        await bus.connect()
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        raise ConfigurationError(
            f"the DSN is not valid ({exc}); write it as postgresql://user:password@host:5432/database"
        ) from exc


@contextlib.asynccontextmanager
async def _connected(args: argparse.Namespace, schema: str) -> AsyncIterator[EventBus]:
    """A connected bus (no relay) for one command, closed afterwards."""
    bus = _bus(args, schema=schema)
    await _connect(bus)
    try:
        yield bus
    finally:
        await bus.close()


def _command_hint(args: argparse.Namespace, command: str, schema: str) -> str:
    """``command`` as the user would type it again against the same database and schema."""
    parts = ["eventbus", command]
    if schema != DEFAULT_SCHEMA:
        parts.append(f"--schema {schema}")
    if args.dsn:
        parts.append(f"--dsn {_redacted(args.dsn)}")
    return " ".join(parts)


def _letter_document(letter: DeadLetter) -> dict[str, Any]:
    document: dict[str, Any] = msgspec.to_builtins(letter)
    with contextlib.suppress(msgspec.DecodeError):  # else keep the stored text as it is
        document["payload"] = msgspec.json.decode(letter.payload)
    return document


# -- commands ------------------------------------------------------------------------------------------------


async def cmd_migrate(args: argparse.Namespace, out: Output) -> int:
    schema = _schema(args)
    bus = _bus(args, schema=schema)
    dsn = await bus.resolve_dsn()
    try:
        conn = await asyncpg.connect(dsn)
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        raise ConfigurationError(
            f"the DSN is not valid ({exc}); write it as postgresql://user:password@host:5432/database"
        ) from exc
    except (OSError, asyncpg.PostgresError) as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {_redacted(dsn)}: {exc}. Check that the server runs and the DSN "
            "(--dsn or EVENTBUS_DSN) is right, or leave both unset to use the embedded server"
        ) from exc
    try:
        applied = await migrate(conn, schema)
    finally:
        await conn.close()
    names = {m.version: f"{m.version:04d}_{m.name}" for m in migrations(schema)}
    if args.json:
        out.json({"schema": schema, "applied": [names[v] for v in applied], "latest": max(names)})
    elif applied:
        out.line(f"applied to schema {schema!r}: {', '.join(names[v] for v in applied)}")
    else:
        out.line(f"schema {schema!r} is up to date (migration {names[max(names)]})")
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, out: Output) -> int:
    schema = _schema(args)
    async with _connected(args, schema) as bus:
        counts = await bus.outbox.counts()
        dead = await bus.dead_letters.count()
        relays = await bus.outbox.relays_alive(within=RelayConfig().heartbeat_interval * 3)
        dsn = _redacted(await bus.resolve_dsn())
    if args.json:
        out.json({
            "dsn": dsn,
            "schema": schema,
            "outbox": dict(counts.items()),
            "dead_letters": [
                {"reason": reason, "subscriber": subscriber, "count": count}
                for (reason, subscriber), count in sorted(dead.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
            ],
            "relays": [dict(r.items()) for r in relays],
        })  # fmt: skip
        return EXIT_OK
    out.line(f"database   {dsn}")
    out.line(f"schema     {schema}")
    oldest = counts["oldest_pending_seconds"]
    out.line(
        f"outbox     {counts['pending']} pending"
        + (f" (oldest due {_age(oldest)} ago)" if oldest is not None else "")
        + f", {counts['in_flight']} in flight, {counts['published']} published, {counts['dead']} dead"
    )
    total_dead = sum(dead.values())
    out.line(f"dead       {_count(total_dead, 'dead letter')} not yet replayed")
    out.line(f"relays     {len(relays)} alive")
    if dead:
        out.line()
        rows = sorted(dead.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))
        out.table(
            ["reason", "subscriber", "count"],
            [(reason, subscriber or "(any)", count) for (reason, subscriber), count in rows],
            title="Dead letters (see `eventbus dlq list`)",
        )
    if relays:
        out.line()
        out.table(
            ["worker", "host", "pid", "started", "last heartbeat", "partitions"],
            [
                (r["worker"], r["hostname"], r["pid"], _since(r["started_at"]), _since(r["heartbeat_at"]),
                 len(r["partitions"] or ()))
                for r in relays
            ],
            title="Relays",
        )  # fmt: skip
    elif counts["pending"] or counts["in_flight"]:
        out.line()
        out.line("no relay is running on this schema: start one with `eventbus relay --app module:bus`")
    return EXIT_OK


async def cmd_dlq_list(args: argparse.Namespace, out: Output) -> int:
    schema = _schema(args)
    where = DeadLetterFilter(
        reason=args.reason, subscriber=args.subscriber, topic=args.topic, include_replayed=args.all
    )
    async with _connected(args, schema) as bus:
        letters = await bus.dead_letters.list(where, limit=args.limit + 1)
    more = len(letters) > args.limit
    letters = letters[: args.limit]
    if args.json:
        out.json({"dead_letters": [_letter_document(d) for d in letters], "more": more})
        return EXIT_OK
    if not letters:
        narrowed = any((args.reason, args.subscriber, args.topic))
        out.line("no dead letters" + (" match these filters" if narrowed else f" in schema {schema!r}"))
        return EXIT_OK
    columns = ["id", "failed", "reason", "subscriber", "topic", "key", "attempts", "error"]
    if args.all:
        columns.insert(2, "replayed")
    rows: list[list[object]] = []
    for d in letters:
        row: list[object] = [
            d.id, _since(d.failed_at), d.reason, d.subscriber or "(any)", d.topic, d.key or "", d.attempts,
            _first_line(d.error),
        ]  # fmt: skip
        if args.all:
            row.insert(2, f"{d.replay_count}x, {_since(d.replayed_at)}" if d.replayed_at else "no")
        rows.append(row)
    out.table(columns, rows)
    if more:
        out.line(f"(showing the newest {args.limit}; more match: raise --limit or narrow with --reason, "
                 "--subscriber or --topic)")  # fmt: skip
    out.line("details: " + _command_hint(args, "dlq show ID", schema))
    return EXIT_OK


async def cmd_dlq_show(args: argparse.Namespace, out: Output) -> int:
    schema = _schema(args)
    async with _connected(args, schema) as bus:
        letter = await bus.dead_letters.get(args.id)
    if letter is None:
        raise EventBusError(
            f"no dead letter with id {args.id} in schema {schema!r}; list them with "
            + _command_hint(args, "dlq list", schema)
        )
    if args.json:
        out.json(_letter_document(letter))
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
        ("source", letter.source),
        ("attempts", letter.attempts),
        ("failed at", f"{letter.failed_at.isoformat(timespec='seconds')} ({_since(letter.failed_at)})"),
        ("replayed", f"{letter.replay_count} times, last {_since(letter.replayed_at)}" if letter.replayed_at
         else "no"),
        ("error type", letter.error_type or "-"),
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
    return EXIT_OK


def _duration(value: str) -> timedelta:
    """``30d``, ``12h``, ``45m``, ``90s`` (or plain seconds) as a timedelta."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    text = value.strip().lower()
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration: write e.g. 30d, 12h, 45m or 90s") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: a duration cannot be negative")
    return timedelta(seconds=seconds)


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of letters per second") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError("--rate must be positive (letters per second)")
    return rate


class _Progress:
    """A progress bar on a terminal (rich), else nothing; counts what a long operation has done."""

    def __init__(self, out: Output, label: str, total: int | None) -> None:
        self._bar: Any = None
        self._task: Any = None
        self.done = 0
        if out.as_json or not sys.stderr.isatty():
            return
        try:
            from rich.progress import Progress
        except ImportError:
            return
        self._bar = Progress(transient=True)
        self._task = self._bar.add_task(label, total=total)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)


async def cmd_dlq_replay(args: argparse.Namespace, out: Output) -> int:
    schema = _schema(args)
    where = DeadLetterFilter(reason=args.reason, subscriber=args.subscriber, topic=args.topic)
    async with _connected(args, schema) as bus:
        if args.dry_run:
            letters = await bus.dead_letters.replay(where, ids=args.id or None, dry_run=True)
        else:
            expected = sum((await bus.dead_letters.count()).values())
            with _Progress(out, "replaying", expected or None) as progress:
                letters = await bus.dead_letters.replay(
                    where, ids=args.id or None, rate=args.rate, on_page=progress.advance
                )
    verb = "would replay" if args.dry_run else "replayed"
    if args.json:
        out.json({"dry_run": args.dry_run, "count": len(letters), "dead_letters": [str(d.id) for d in letters]})
        return EXIT_OK
    if not letters:
        out.line("nothing to replay: no unreplayed dead letters match")
        return EXIT_OK
    by_target: dict[tuple[str, str], int] = {}
    for d in letters:
        slot = (d.reason, d.subscriber or "(every subscriber)")
        by_target[slot] = by_target.get(slot, 0) + 1
    out.table(["reason", "subscriber", "letters"], [[r, s, n] for (r, s), n in sorted(by_target.items())])
    out.line(f"{verb} {_count(len(letters), 'dead letter')}")
    if args.dry_run:
        out.line("nothing was written; run again without --dry-run to replay")
    else:
        out.line("each went back to its subscriber as a new outbox row; a relay delivers it with fresh attempts")
    return EXIT_OK


async def cmd_dlq_purge(args: argparse.Namespace, out: Output) -> int:
    schema = _schema(args)
    async with _connected(args, schema) as bus:
        deleted = await bus.dead_letters.purge(args.older_than, include_unreplayed=args.include_unreplayed)
    if args.json:
        out.json({"deleted": deleted})
    else:
        kind = "dead letters" if args.include_unreplayed else "replayed dead letters"
        out.line(f"deleted {deleted} {kind} older than {args.older_than}")
    return EXIT_OK


async def cmd_outbox_purge(args: argparse.Namespace, out: Output) -> int:
    schema = _schema(args)
    async with _connected(args, schema) as bus:
        with _Progress(out, "purging", None) as progress:
            deleted = await bus.outbox.purge(args.older_than, batch=args.batch, on_batch=progress.advance)
    if args.json:
        out.json({"deleted": deleted})
    else:
        out.line(f"deleted {deleted} published outbox rows older than {args.older_than} (in batches of {args.batch})")
    return EXIT_OK


def _load_app(spec: str) -> EventBus:
    """Import ``module:attribute`` and return the EventBus it names (or that a zero-argument callable returns)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"--app {spec!r} must be module:attribute, for example myservice.events:bus")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the project folder's modules are importable
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigurationError(
                f"cannot import {module_name!r} for --app ({exc}); run from your project folder or add it to PYTHONPATH"
            ) from exc
        raise
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r} (from --app)") from None
    if not isinstance(target, EventBus) and callable(target):
        try:
            inspect.signature(target).bind()
        except TypeError:
            raise ConfigurationError(
                f"--app {spec} is a function that needs arguments; name an EventBus or a zero-argument function "
                "returning one"
            ) from None
        except ValueError:
            pass  # no signature to inspect (a builtin): just call it
        if inspect.iscoroutinefunction(target):
            raise ConfigurationError(f"--app {spec} is an async function; make it a plain function returning the bus")
        target = target()
    if not isinstance(target, EventBus):
        raise ConfigurationError(
            f"--app {spec} is a {type(target).__name__}, not an EventBus (or a zero-argument function returning one)"
        )
    return target


async def cmd_relay(args: argparse.Namespace, out: Output) -> int:
    bus = _load_app(args.app)
    if bus.relay is not None:
        raise ConfigurationError(f"the bus from --app {args.app} is already running; pass one that is not started")
    if args.dsn:
        bus._dsn = args.dsn  # EventBus has no public setter for the DSN; it is read when the bus connects
    if args.schema:
        quote_schema(args.schema)
        bus.schema = args.schema
    if not bus.subscriptions:
        raise ConfigurationError(
            f"the bus from --app {args.app} has no subscribers: import the modules that define its handlers from "
            f"{args.app.partition(':')[0]!r} (a relay without subscribers would dead-letter every event)"
        )
    bus.run_relay = True
    subscribers = sorted(bus.subscriptions)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            try:
                await bus.start()
            except (asyncpg.ClientConfigurationError, ValueError) as exc:
                raise ConfigurationError(
                    f"the DSN is not valid ({exc}); write it as postgresql://user:password@host:5432/database"
                ) from exc
            relay = bus.relay
            worker = relay.worker if relay is not None else "?"
            dsn = _redacted(await bus.resolve_dsn())
            if args.json:
                out.json({"event": "started", "worker": worker, "schema": bus.schema, "dsn": dsn,
                          "subscribers": subscribers, "pid": os.getpid()}, compact=True)  # fmt: skip
            else:
                out.line(
                    f"relay {worker} started on schema {bus.schema!r} at {dsn} with "
                    f"{len(subscribers)} subscribers ({', '.join(subscribers)}); stop it with Ctrl+C or SIGTERM"
                )
            async for signum in signals:
                if not args.json:
                    out.line(
                        f"{signal.Signals(signum).name} received: finishing the work in hand "
                        f"(up to {bus.stop_timeout:g} s), then stopping"
                    )
                break
        finally:
            await bus.stop()
    stats = bus.statistics()
    if args.json:
        out.json({"event": "stopped", "worker": worker, "delivered": stats.delivered, "retried": stats.retried,
                  "dead_lettered": stats.dead_lettered}, compact=True)  # fmt: skip
    else:
        out.line(
            f"relay {worker} stopped: {_count(stats.delivered, 'delivery', 'deliveries')}, "
            f"{_count(stats.retried, 'retry', 'retries')} scheduled, "
            f"{stats.dead_lettered} dead-lettered"
        )
    return EXIT_OK


# -- demo ----------------------------------------------------------------------------------------------------


@topic("eventbus.demo.greeting")
class Greeting(msgspec.Struct, frozen=True):
    """The demo's event: someone to greet (and to send a welcome mail to)."""

    name: str


DEMO_NAMES = ("Ada", "Grace", "Linus")
DEMO_SLOW = "Grace"  # the mail server hangs for this one


async def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    schema = _schema(args, DEMO_SCHEMA)
    bus = _bus(args, schema=schema, migrate=True, relay=True, relay_config=RelayConfig(poll_interval=0.2))
    greeted: list[str] = []
    mailed: list[str] = []
    mail_attempts: list[int] = []

    async def greeter(event: Greeting, ctx: Context) -> None:
        greeted.append(event.name)

    async def mailer(event: Greeting, ctx: Context) -> None:
        if event.name == DEMO_SLOW:
            mail_attempts.append(ctx.attempt)
            await anyio.sleep(1)  # longer than the 0.2 s timeout: every attempt times out
        mailed.append(event.name)

    bus.subscribe(name="demo.greeter", timeout=5)(greeter)
    bus.subscribe(name="demo.mailer", timeout=0.2, max_attempts=2, backoff=Backoff(initial=0.1, jitter=0.0))(mailer)

    await _connect(bus)
    try:
        # The demo's relay knows only the demo's handlers: on a schema in use it would dead-letter the
        # application's events as HandlerMissing (and other relays would take the demo's). So it needs a quiet one.
        relays = await bus.outbox.relays_alive(within=RelayConfig().heartbeat_interval * 3)
        unsettled = await bus.outbox.unsettled()
    except BaseException:
        await bus.close()
        raise
    if relays or unsettled:
        await bus.close()
        in_use = f"{_count(len(relays), 'relay')} alive, {_count(unsettled, 'event')} pending or in flight"
        raise ConfigurationError(
            f"schema {schema!r} is in use ({in_use}); run the demo on a schema of its own, e.g. --schema {DEMO_SCHEMA}"
        )
    started = datetime.now(UTC)
    async with bus:
        async with bus.transaction() as tx:
            for name in DEMO_NAMES:
                await tx.publish(Greeting(name), key=name.lower())
        await bus.drain(timeout=30)
        stats = bus.statistics()
        letters = await bus.dead_letters.list(DeadLetterFilter(subscriber="demo.mailer", since=started))
        dsn = _redacted(await bus.resolve_dsn())
    if args.json:
        out.json(
            {
                "schema": schema,
                "dsn": dsn,
                "published": list(DEMO_NAMES),
                "greeted": greeted,
                "mailed": mailed,
                "retried": stats.retried,
                "dead_letters": [_letter_document(d) for d in letters],
            }
        )
        return EXIT_OK
    mailed_to = ", ".join(mailed) or "nobody"
    say = out.line
    say(f"Demo on schema {schema!r} at {dsn}")
    say()
    say(f"1. Published {len(DEMO_NAMES)} Greeting events ({', '.join(DEMO_NAMES)}) in one transaction.")
    say("   They were stored in the outbox table and delivered only after the transaction committed.")
    say(f"2. The handler demo.greeter succeeded for every one: {', '.join(greeted)}.")
    say(f"3. The handler demo.mailer succeeded for {mailed_to}. For {DEMO_SLOW} it ran past its 0.2 s timeout")
    say(f"   on all {_count(len(mail_attempts), 'attempt')}: it was retried {_count(stats.retried, 'time')} after a "
        "short backoff, for the mailer alone (the greeter did not run again).")  # fmt: skip
    say("   After its last allowed attempt the delivery moved to the dead-letter table, reason HandlerTimeout:")
    say()
    out.table(
        ["id", "reason", "subscriber", "topic", "key", "attempts"],
        [(d.id, d.reason, d.subscriber, d.topic, d.key, d.attempts) for d in letters],
    )
    say()
    say("Look around:")
    say(f"  {_command_hint(args, 'status', schema)}")
    say(f"  {_command_hint(args, 'dlq list', schema)}")
    if letters:
        say(f"  {_command_hint(args, f'dlq show {letters[0].id}', schema)}")
    say("Once its cause is fixed, a dead letter can be replayed (bus.dead_letters.replay(...)); replaying it twice")
    say("has one effect.")
    return EXIT_OK


# -- the parser ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, with the usage error exit code."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """The options every command takes, before or after the command name.

    On the subcommands they default to ``SUPPRESS`` so that an option given before the command is kept.
    """
    parser.add_argument(
        "--dsn", default=default,
        help="PostgreSQL URL (default: $EVENTBUS_DSN, else the embedded server in ./.eventbus)",
    )  # fmt: skip
    parser.add_argument("--schema", default=default, help=f"schema of eventbus's tables (default: {DEFAULT_SCHEMA})")
    parser.add_argument("--json", action="store_true", default=default, help="print machine-readable JSON")
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")


Command = Callable[[argparse.Namespace, Output], Awaitable[int]]


def _letter_filters(p: argparse.ArgumentParser) -> None:
    """The options that pick dead letters, shared by `dlq list` and `dlq replay`."""
    p.add_argument("--reason", type=_reason, help=f"one of {', '.join(r.value for r in Reason)}")
    p.add_argument("--subscriber", help="subscriber name")
    p.add_argument("--topic", help="event topic")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eventbus", description="Transactional outbox event bus for PostgreSQL.")
    _global_options(parser, default=None)
    parser.set_defaults(json=False, debug=False)
    common = _Parser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = commands.add_parser("migrate", parents=[common], help="apply missing migrations to the schema")
    p.set_defaults(command=cmd_migrate)

    p = commands.add_parser("status", parents=[common], help="pending and in-flight events, dead letters, relays alive")
    p.set_defaults(command=cmd_status)

    p = commands.add_parser(
        "relay", parents=[common], help="run a relay process for an application's bus until SIGTERM/SIGINT",
        description="Import the application's EventBus and deliver its events until SIGTERM or SIGINT. "
        "--dsn and --schema override the bus's own settings only when given.",
    )  # fmt: skip
    p.add_argument(
        "--app",
        required=True,
        metavar="MODULE:ATTR",
        help="the EventBus (or a zero-argument function returning one), e.g. myservice.events:bus",
    )
    p.set_defaults(command=cmd_relay)

    dlq = commands.add_parser("dlq", parents=[common], help="dead letters: list, show, replay, purge")
    dlq_commands = dlq.add_subparsers(title="commands", metavar="COMMAND")
    dlq.set_defaults(command=None, help_parser=dlq)
    p = dlq_commands.add_parser("list", parents=[common], help="list dead letters, newest first")
    _letter_filters(p)
    p.add_argument("--limit", type=_positive, default=20, help="how many to show (default 20)")
    p.add_argument("--all", action="store_true", help="include dead letters already replayed")
    p.set_defaults(command=cmd_dlq_list)
    p = dlq_commands.add_parser("show", parents=[common], help="show one dead letter in full")
    p.add_argument("id", type=_dead_letter_id, help="the dead letter's id (from `eventbus dlq list`)")
    p.set_defaults(command=cmd_dlq_show)
    p = dlq_commands.add_parser(
        "replay", parents=[common], help="send dead letters back to their subscribers (once each)",
        description="Re-offer unreplayed dead letters as rows targeted at their subscriber. Each letter is "
        "replayed once, however often or from however many shells this runs.",
    )  # fmt: skip
    p.add_argument("--id", type=_dead_letter_id, action="append", help="a dead letter id (repeatable)")
    _letter_filters(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be replayed; write nothing")
    p.add_argument("--rate", type=_rate, help="at most this many letters per second (spare a recovering service)")
    p.set_defaults(command=cmd_dlq_replay)
    p = dlq_commands.add_parser("purge", parents=[common], help="delete old replayed dead letters")
    p.add_argument("--older-than", type=_duration, required=True, metavar="AGE", help="e.g. 30d, 12h")
    p.add_argument("--include-unreplayed", action="store_true", help="also delete letters never replayed")
    p.set_defaults(command=cmd_dlq_purge)

    outbox = commands.add_parser("outbox", parents=[common], help="maintain the outbox table (purge)")
    outbox_commands = outbox.add_subparsers(title="commands", metavar="COMMAND")
    outbox.set_defaults(command=None, help_parser=outbox)
    p = outbox_commands.add_parser("purge", parents=[common], help="delete published rows older than an age")
    p.add_argument("--older-than", type=_duration, required=True, metavar="AGE", help="e.g. 7d, 12h")
    p.add_argument("--batch", type=_positive, default=5000, help="rows per delete statement (default 5000)")
    p.set_defaults(command=cmd_outbox_purge)

    p = commands.add_parser(
        "demo", parents=[common], help="see delivery, retries and dead letters at work (on its own schema)",
        description=f"Publish a few events to two handlers, one of which times out, and explain what happened. "
        f"Uses the schema {DEMO_SCHEMA!r} unless --schema is given.",
    )  # fmt: skip
    p.set_defaults(command=cmd_demo)
    parser.set_defaults(command=None, help_parser=parser)
    return parser


# -- errors and the entry point ------------------------------------------------------------------------------


def _explain(exc: BaseException) -> tuple[int, str]:
    """The exit code for ``exc`` and the one line that tells the user what happened."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _explain(exc.exceptions[0])
    if isinstance(exc, MigrationsMissing):
        return EXIT_MIGRATIONS, str(exc)
    if isinstance(exc, DatabaseUnavailable):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, EventBusError):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, ConnectionError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
        return EXIT_UNREACHABLE, f"lost the connection to PostgreSQL ({exc}); check the server and retry"
    if isinstance(exc, OSError):
        return EXIT_FAILED, f"{exc}; rerun with --debug for the traceback"
    if isinstance(exc, asyncpg.PostgresError):
        return EXIT_FAILED, f"PostgreSQL refused the request: {exc} (SQLSTATE {exc.sqlstate}); rerun with --debug"
    if isinstance(exc, TimeoutError):
        return EXIT_FAILED, str(exc) or "timed out"
    return EXIT_FAILED, f"unexpected {type(exc).__name__}: {exc}; rerun with --debug for the traceback"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``eventbus`` command with ``argv`` (default: the process's arguments); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        args.help_parser.print_help(sys.stderr)
        return EXIT_USAGE
    warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")  # embedded server's noise
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    out = Output(as_json=args.json)
    command: Command = args.command
    try:
        return anyio.run(command, args, out)
    except BrokenPipeError:  # the reader went away (`eventbus dlq list | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("eventbus: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code, message = _explain(exc)
        if args.debug:
            traceback.print_exc()
        print(f"eventbus: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
