"""Applies the package's ordered ``.sql`` migrations under an advisory lock, recording them in a version table.

Safe to run from several processes at once: the first takes the lock and applies, the others wait and then
find nothing left to do.

A migration never queues behind a busy table: its statements run with a ``lock_timeout``, and when one cannot
take its lock in that time, the whole run rolls back and is tried again after a pause. A waiting ``ALTER TABLE``
would otherwise block every statement on that table behind it (the relay's claims, the producers' inserts) for
as long as the transaction it waits for runs.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import anyio
import asyncpg

from ._typing import Connection
from .errors import ConfigurationError, MigrationLocked, MigrationsMissing
from .roles import partitioned_grants
from .sql import Migration, Queries, contractions, migrations, partitioned_layout, quote_schema

__all__ = [
    "Partitioning", "check_migrations", "latest_version", "migrate", "migration_script", "pending_migrations",
    "pending_sql", "schemas_found",
]  # fmt: skip

#: The partitioned outbox layout, by the span of its settled partitions (see ``eventbus/sql/partitioned.sql``).
Partitioning = Literal["daily", "hourly"]
_PERIODS: dict[str, str] = {"daily": "day", "hourly": "hour"}

log = logging.getLogger("eventbus.migrations")


def latest_version() -> int:
    return migrations("eventbus")[-1].version


async def _applied(conn: Connection, queries: Queries) -> set[int]:
    if not await conn.fetchval(queries.schema_version_table, queries.schema):
        return set()
    return {row["version"] for row in await conn.fetch(queries.migrate_applied)}


async def pending_migrations(conn: Connection, schema: str = "eventbus") -> list[int]:
    """Versions of this package's migrations that ``schema`` lacks."""
    queries = Queries(schema)
    applied = await _applied(conn, queries)
    return [m.version for m in migrations(schema) if m.version not in applied]


async def pending_sql(
    conn: Connection, schema: str = "eventbus", *, to: int | None = None, contract: bool = False,
    partitioning: Partitioning | None = None,
) -> list[Migration]:  # fmt: skip
    """The migrations :func:`migrate` would apply to ``schema`` (up to version ``to``), with their SQL; with
    ``contract``, then the contract steps it would run; with ``partitioning``, then the conversion of the outbox
    (version 0), unless it has that layout already (then the change of its period, if it has another)."""
    queries = Queries(schema)
    planned = _planned(await _applied(conn, queries), schema, to, contract)
    if partitioning is not None:
        period = await _layout(conn, queries)
        if period is None:
            planned.append(_conversion(schema, partitioning, to))
        elif period != _PERIODS[partitioning]:
            sql = queries.outbox_set_period.replace("$1", f"'{_PERIODS[partitioning]}'").rstrip() + "\n"
            planned.append(Migration(0, f"partitioning period ({partitioning})", sql))
    return planned


def _conversion(schema: str, partitioning: Partitioning, to: int | None = None) -> Migration:
    """The conversion to the partitioned layout, with the relay role's grants for it."""
    if partitioning not in _PERIODS:
        raise ConfigurationError(f"partitioning {partitioning!r} is not one of 'daily', 'hourly' (or None: plain)")
    if to is not None and to < latest_version():
        raise ConfigurationError(f"partitioning needs every migration (up to {latest_version()}): leave out to={to} "
                                 "(--to), or migrate in two runs")  # fmt: skip
    sql = f"{partitioned_layout(schema, _PERIODS[partitioning]).rstrip()}\n\n{partitioned_grants(schema)};\n"
    return Migration(0, f"partitioned outbox ({partitioning})", sql)


def migration_script(schema: str, planned: list[Migration], *, lock_timeout: float = 2.0) -> str:
    """``planned`` (from :func:`pending_sql`) as one SQL script that does what :func:`migrate` would do, in one
    transaction: for ``eventbus migrate --dry-run``, to read, or to run by hand (``psql -1 -f`` is not needed: it
    has its BEGIN and COMMIT). Unlike :func:`migrate`, it does not try again when a lock is not free in time."""
    queries = Queries(schema)
    lock = f"eventbus.migrate.{schema}"  # a schema name is [a-z0-9_]: nothing to escape
    parts = [
        "BEGIN;",
        queries.migrate_lock.replace("$1", f"'{lock}'").rstrip().rstrip(";") + ";",
        f"SET LOCAL lock_timeout = '{max(1, round(lock_timeout * 1000))}ms';",
        queries.migrate_prepare.rstrip(),
    ]
    for migration in planned:
        version = -migration.version if migration.contract else migration.version
        name = f"{migration.name} (contract)" if migration.contract else migration.name
        title = f"{migration.version:04d}_{name}" if migration.version else name
        parts.append(f"-- {title}\n{migration.sql.rstrip()}")
        if migration.version != 0:  # the conversion is recorded in eventbus_layout
            quoted = "'" + name.replace("'", "''") + "'"
            parts.append(queries.migrate_record.replace("$1", str(version)).replace("$2", quoted).rstrip())
    parts.append("COMMIT;")
    return "\n\n".join(parts) + "\n"


async def _layout(conn: Connection, queries: Queries) -> str | None:
    """The period of ``queries.schema``'s partitioned outbox ('day', 'hour'), or None for the plain layout."""
    table = f"{quote_schema(queries.schema)}.eventbus_outbox"
    if not await conn.fetchval(queries.outbox_partitioned, table):
        return None
    return str(await conn.fetchval(queries.outbox_layout))


def _planned(applied: set[int], schema: str, to: int | None, contract: bool) -> list[Migration]:
    """What a run applies, in order: the migrations missing (up to ``to``), then, with ``contract``, the contract
    steps of the migrations applied by then that have not run (recorded as ``-version``)."""
    wanted = [m for m in migrations(schema) if m.version not in applied and (to is None or m.version <= to)]
    if contract:
        will_have = applied | {m.version for m in wanted}
        wanted += [m for m in contractions(schema) if m.version in will_have and -m.version not in applied]
    return wanted


async def migrate(
    conn: Connection, schema: str = "eventbus", *, to: int | None = None, lock_timeout: float = 2.0,
    give_up_after: float = 120.0, contract: bool = False, partitioning: Partitioning | None = None,
) -> list[int]:  # fmt: skip
    """Bring ``schema`` up to date (or up to version ``to``); return the versions this call applied (empty when
    already current). Each statement waits at most ``lock_timeout`` seconds for a table lock; a run that could not
    take one is rolled back and tried again, for at most ``give_up_after`` seconds, then :class:`MigrationLocked`.

    Migrations only add, so the release before keeps working against the migrated schema during a rolling
    deploy. ``contract`` then also runs the contract steps of the applied migrations (what they kept for that
    release; see :func:`eventbus.sql.contractions`), recorded as their version negated: run it once no process
    of the release before runs.

    ``partitioning`` (``"daily"`` or ``"hourly"``) then converts a plain outbox to the partitioned layout, in
    the same transaction, recorded as version 0 in what this returns (see ``eventbus/sql/partitioned.sql``: the
    conversion holds the outbox for as long as it takes to read it once); an outbox partitioned already only takes
    the period for the partitions made from then on. The conversion needs every producer and relay to run this
    release or a later one (the release before names a unique index the layout lacks)."""
    if partitioning is not None:
        _conversion(schema, partitioning, to)  # refuse a bad value before any lock is taken
    started = time.monotonic()
    tries = 0
    while True:
        try:
            return await _migrate_once(conn, schema, to, lock_timeout, contract, partitioning)
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
            tries += 1
            pause = min(5.0, 0.25 * 2 ** min(tries, 5))
            waited = time.monotonic() - started
            if waited + pause > give_up_after:
                raise MigrationLocked(
                    f"migrating schema {schema!r}: no lock on an eventbus table within {lock_timeout:g} s (or a "
                    f"deadlock), {tries} times in {waited:.0f} s ({exc}). A long transaction holds a conflicting lock: "
                    "find it with "
                    "`SELECT pid, state, xact_start, query FROM pg_stat_activity WHERE xact_start < now() - "
                    "interval '1 minute'`, let it end, and run `eventbus migrate` again"
                ) from exc
            log.warning("migrating schema %r: a table is busy (%s); rolled back, trying again in %.1f s", schema,
                        exc, pause)  # fmt: skip
            await anyio.sleep(pause)


async def _migrate_once(
    conn: Connection, schema: str, to: int | None, lock_timeout: float, contract: bool,
    partitioning: Partitioning | None,
) -> list[int]:  # fmt: skip
    queries = Queries(schema)
    done: list[int] = []
    async with conn.transaction():
        await conn.execute(queries.migrate_lock, f"eventbus.migrate.{schema}")
        # After the advisory lock: migrators of the same schema wait for each other, as long as it takes.
        await conn.execute(queries.migrate_lock_timeout, f"{max(1, round(lock_timeout * 1000))}ms")
        await conn.execute(queries.migrate_prepare)
        for migration in _planned(await _applied(conn, queries), schema, to, contract):
            await conn.execute(migration.sql)
            version = -migration.version if migration.contract else migration.version
            name = f"{migration.name} (contract)" if migration.contract else migration.name
            await conn.execute(queries.migrate_record, version, name)
            done.append(version)
        if partitioning is not None:
            period = await _layout(conn, queries)
            if period is None:
                await conn.execute(_conversion(schema, partitioning).sql)
                done.append(0)
            elif period != _PERIODS[partitioning]:
                await conn.execute(queries.outbox_set_period, _PERIODS[partitioning])
    return done


async def schemas_found(conn: Connection, schema: str) -> tuple[bool, list[str]]:
    """Whether ``schema`` exists, and the names of the schemas that hold eventbus tables."""
    row = await conn.fetchrow(Queries(schema).schemas_found, schema)
    assert row is not None
    return bool(row["exists"]), list(row["found"])


async def check_migrations(conn: Connection, schema: str = "eventbus") -> None:
    """Raise :class:`MigrationsMissing` unless every migration of this package is applied to ``schema``."""
    missing = await pending_migrations(conn, schema)
    if missing:
        raise MigrationsMissing(
            f"schema {schema!r} lacks eventbus migrations {missing}; run `eventbus migrate --schema {schema}` "
            "or create the bus with EventBus(..., migrate=True)"
        )
