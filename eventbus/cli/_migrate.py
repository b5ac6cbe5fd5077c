"""``eventbus migrate``: apply missing migrations to a schema."""

from __future__ import annotations

import argparse

from .._driver import connect
from ..migrations import migrate, migration_script, pending_sql
from ..roles import apply_roles, role_sql, roles_for
from ..sql import Migration, contractions, migrations
from ._common import EXIT_OK, new_bus, schema_of
from ._output import Output

__all__ = ["cmd_migrate"]


def _name(migration: Migration, names: dict[int, str]) -> str:
    if migration.version == 0:  # the partitioned layout's conversion, or the change of its period
        return migration.name
    return names[-migration.version if migration.contract else migration.version]


async def cmd_migrate(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    conn = await connect(await new_bus(args, schema=schema).resolve_dsn())
    try:
        if args.dry_run:
            pending = await pending_sql(conn, schema, contract=args.contract, partitioning=args.partitioning)
        else:
            applied = await migrate(conn, schema, lock_timeout=args.lock_timeout, contract=args.contract,
                                    partitioning=args.partitioning)
            if args.roles is not None:
                await apply_roles(conn, schema, args.roles)
    finally:
        await conn.close()
    roles = [] if args.roles is None else roles_for(schema, args.roles)
    names = {m.version: f"{m.version:04d}_{m.name}" for m in migrations(schema)}
    names.update({-m.version: f"{m.version:04d}_{m.name} (contract)" for m in contractions(schema)})
    latest = names[max(names)]
    names[0] = f"partitioned outbox ({args.partitioning})"
    if args.dry_run:
        if args.json:
            out.json({"schema": schema, "pending": [{"name": _name(m, names), "sql": m.sql} for m in pending],
                      "script": migration_script(schema, pending, lock_timeout=args.lock_timeout) if pending else None,
                      "roles": [] if args.roles is None else role_sql(schema, args.roles)})  # fmt: skip
            return EXIT_OK
        elif pending:
            out.line(f"-- schema {schema!r} lacks {len(pending)} migration(s): "
                     f"{', '.join(_name(m, names) for m in pending)}. `eventbus migrate` would run this script, in one "
                     f"transaction, each statement waiting at most {args.lock_timeout:g} s for its lock (and try "
                     "again when one is busy; the script, run by hand, fails instead):")  # fmt: skip
            out.line()
            out.line(migration_script(schema, pending, lock_timeout=args.lock_timeout).rstrip())
        else:
            out.line(f"-- schema {schema!r} is up to date (migration {latest}): no migration would run")
        if args.roles is not None:
            out.line()
            out.line("-- then the roles (and each tenant role's row in eventbus_tenant_roles):")
            for statement in role_sql(schema, args.roles):
                out.line(f"{statement};")
        return EXIT_OK
    if args.json:
        out.json({"schema": schema, "applied": [names[v] for v in applied], "latest": max(names),
                  "roles": [{"name": r.name, "kind": r.kind, "tenant": r.tenant} for r in roles]})  # fmt: skip
        return EXIT_OK
    if applied:
        out.line(f"applied to schema {schema!r}: {', '.join(names[v] for v in applied)}")
    else:
        out.line(f"schema {schema!r} is up to date (migration {latest})")
    if not args.contract and any(step.version in applied for step in contractions(schema)):
        out.line("once no process of the release before runs: `eventbus migrate --contract` removes what these "
                 "migrations kept for it")  # fmt: skip
    for r in roles:
        scope = "every tenant" if r.tenant is None else f"tenant {r.tenant!r} only"
        out.line(f"role {r.name}: {r.kind}, {scope}")
    if roles:
        out.line(f"grant them to your login roles, e.g. GRANT {roles[0].name} TO my_relay_login")
    return EXIT_OK
