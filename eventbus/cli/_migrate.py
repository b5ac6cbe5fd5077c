"""``eventbus migrate``: apply missing migrations to a schema."""

from __future__ import annotations

import argparse

from .._driver import connect
from ..migrations import migrate, pending_sql
from ..sql import migrations
from ._common import EXIT_OK, new_bus, schema_of
from ._output import Output

__all__ = ["cmd_migrate"]


async def cmd_migrate(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    conn = await connect(await new_bus(args, schema=schema).resolve_dsn())
    try:
        if args.dry_run:
            pending = await pending_sql(conn, schema)
        else:
            applied = await migrate(conn, schema, lock_timeout=args.lock_timeout)
    finally:
        await conn.close()
    names = {m.version: f"{m.version:04d}_{m.name}" for m in migrations(schema)}
    if args.dry_run:
        if args.json:
            out.json({"schema": schema, "pending": [{"name": names[m.version], "sql": m.sql} for m in pending]})
        elif pending:
            out.line(f"-- schema {schema!r} lacks {len(pending)} migration(s); `eventbus migrate` would run, in one "
                     f"transaction, each statement waiting at most {args.lock_timeout:g} s for its lock:")
            for m in pending:
                out.line()
                out.line(f"-- {names[m.version]}")
                out.line(m.sql.rstrip())
        else:
            out.line(f"-- schema {schema!r} is up to date (migration {names[max(names)]}): nothing would run")
        return EXIT_OK
    if args.json:
        out.json({"schema": schema, "applied": [names[v] for v in applied], "latest": max(names)})
    elif applied:
        out.line(f"applied to schema {schema!r}: {', '.join(names[v] for v in applied)}")
    else:
        out.line(f"schema {schema!r} is up to date (migration {names[max(names)]})")
    return EXIT_OK
