"""What every command shares: the argument types, the bus a command connects with, and how to say a command
again."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from .._driver import redact_dsn
from ..bus import EventBus
from ..errors import ConfigurationError, MigrationsMissing
from ..migrations import schemas_found
from ..repositories import DeadLetter, DeadLetterFilter, Reason

__all__ = [
    "DEFAULT_SCHEMA",
    "EXIT_FAILED",
    "EXIT_MIGRATIONS",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "command_hint",
    "connected",
    "dead_letter_filter",
    "dead_letter_id",
    "duration",
    "filters_given",
    "letter_document",
    "letter_filters",
    "log_level",
    "moment",
    "new_bus",
    "port",
    "positive",
    "rate",
    "reason",
    "schema_of",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_MIGRATIONS = 4

DEFAULT_SCHEMA = "eventbus"

# -- argument types --------------------------------------------------------------------------------------------


def reason(value: str) -> str:
    """``--reason``: a reason name in any case, with or without underscores."""
    wanted = value.replace("_", "").replace("-", "").lower()
    for known in Reason:
        if known.value.lower() == wanted:
            return known.value
    raise argparse.ArgumentTypeError(f"unknown reason {value!r}; use one of {', '.join(r.value for r in Reason)}")


def positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def dead_letter_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a dead-letter id (a UUID, as printed by `eventbus dlq list`)"
        ) from None


def duration(value: str) -> timedelta:
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


def moment(value: str) -> datetime:
    """``--since``/``--until``: an ISO 8601 time (UTC unless it names a zone), or an age such as ``2h`` (that long
    ago)."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        try:
            return datetime.now(UTC) - duration(value)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"{value!r} is neither a time (e.g. 2026-01-31T12:00, UTC unless a zone is given) "
                "nor an age (e.g. 2h, 30m, 7d)"
            ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def rate(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of letters per second") from None
    if number <= 0:
        raise argparse.ArgumentTypeError("--rate must be positive (letters per second)")
    return number


def letter_filters(parser: argparse.ArgumentParser) -> None:
    """The options that pick dead letters, as :class:`DeadLetterFilter` has them (``--tenant``, an option of every
    command, picks them too)."""
    parser.add_argument("--reason", type=reason, help=f"one of {', '.join(r.value for r in Reason)}")
    parser.add_argument("--subscriber", help="subscriber name")
    parser.add_argument("--topic", help="event topic")
    parser.add_argument(
        "--since", type=moment, metavar="TIME", help="failed at or after TIME (ISO 8601, UTC by default, or an age: 2h)"
    )
    parser.add_argument("--until", type=moment, metavar="TIME", help="failed at or before TIME (as --since)")


def filters_given(args: argparse.Namespace) -> bool:
    """Whether the command line narrowed the dead letters (by any filter of :func:`letter_filters`, or ``--id``)."""
    picked = (args.reason, args.subscriber, args.topic, tenant_of(args), args.since, args.until,
              getattr(args, "id", None))  # fmt: skip
    return any(value is not None for value in picked)


def dead_letter_filter(args: argparse.Namespace, *, include_replayed: bool = False) -> DeadLetterFilter:
    return DeadLetterFilter(
        reason=args.reason, subscriber=args.subscriber, topic=args.topic, tenant=tenant_of(args), since=args.since,
        until=args.until, include_replayed=include_replayed,
    )  # fmt: skip


# -- connecting ------------------------------------------------------------------------------------------------


def schema_of(args: argparse.Namespace, default: str = DEFAULT_SCHEMA) -> str:
    """``--schema``, else ``default``; an empty ``--schema ''`` is an error, not the default."""
    if args.schema == "":
        raise ConfigurationError(f"--schema is empty: name a schema, or leave the option out for {default!r}")
    return str(args.schema) if args.schema is not None else default


def tenant_of(args: argparse.Namespace) -> str | None:
    """``--tenant`` (None when not given)."""
    tenant: str | None = getattr(args, "tenant", None)
    return tenant


def new_bus(args: argparse.Namespace, *, schema: str, migrate: bool = False, **options: Any) -> EventBus:
    """A bus for one command, acting as ``--tenant`` (the row-level security of a role confined to tenants sees
    only that tenant's rows)."""
    options.setdefault("tenant", tenant_of(args) or "")
    return EventBus(args.dsn, schema=schema, migrate=migrate, **options)


@contextlib.asynccontextmanager
async def connected(args: argparse.Namespace, schema: str) -> AsyncIterator[EventBus]:
    """A connected bus (no relay) for one command, closed afterwards."""
    bus = new_bus(args, schema=schema)
    try:
        await bus.connect()
    except MigrationsMissing:
        await _schema_not_found(args, bus, schema)
        raise
    try:
        yield bus
    finally:
        await bus.close()


async def _schema_not_found(args: argparse.Namespace, bus: EventBus, schema: str) -> None:
    """Raise a :class:`ConfigurationError` naming the schemas that hold eventbus tables (the nearest to ``schema``
    first) when ``schema`` is not one a user could mean to migrate: a ``--schema`` that does not exist (a typo),
    or the default when it holds no eventbus tables but other schemas do. Return otherwise: then the advice to
    migrate it stands."""
    conn = await asyncpg.connect(await bus.resolve_dsn())
    try:
        exists, found = await schemas_found(conn, schema)
    finally:
        await conn.close()
    if (args.schema is None and (not found or schema in found)) or (args.schema is not None and exists):
        return
    nearest = difflib.get_close_matches(schema, found, n=3, cutoff=0.5)
    names = nearest + [name for name in found if name not in nearest]
    listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "") or "none yet"
    hint = f"; try `{command_hint(args, getattr(args, 'command_name', 'status'), nearest[0])}`" if nearest else ""
    if args.schema is None:
        raise ConfigurationError(
            f"schema {schema!r} (the default) holds no eventbus tables; schemas that do: {listed}. Name one with "
            f"--schema{hint}"
        )
    raise ConfigurationError(
        f"schema {schema!r} not found in this database; schemas with eventbus tables: {listed}{hint}"
    )


def command_hint(args: argparse.Namespace, command: str, schema: str) -> str:
    """``command`` as the user would type it again against the same database and schema."""
    parts = ["eventbus", command]
    if schema != DEFAULT_SCHEMA:
        parts.append(f"--schema {schema}")
    if args.dsn:
        parts.append(f"--dsn {redact_dsn(args.dsn)}")
    return " ".join(parts)


def letter_document(letter: DeadLetter) -> dict[str, Any]:
    document: dict[str, Any] = msgspec.to_builtins(letter)
    with contextlib.suppress(msgspec.DecodeError):  # else keep the stored text as it is
        document["payload"] = msgspec.json.decode(letter.payload)
    return document


_LEVELS = ("debug", "info", "warning", "error")


def log_level(text: str) -> str:
    """A ``--log-level`` value, as logging's level name."""
    if text.lower() not in _LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use one of {', '.join(_LEVELS)}")
    return text.upper()


def port(text: str) -> int:
    """A TCP port number (0 picks a free one)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; give a number from 1 to 65535, e.g. 9464")
    return value
