"""Applies the package's ordered ``.sql`` migrations under an advisory lock, recording them in a version table.

Safe to run from several processes at once: the first takes the lock and applies, the others wait and then
find nothing left to do.
"""

from __future__ import annotations

from ._typing import Connection
from .errors import MigrationsMissing
from .sql import Queries, migrations

__all__ = ["check_migrations", "latest_version", "migrate", "pending_migrations"]


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


async def migrate(conn: Connection, schema: str = "eventbus") -> list[int]:
    """Bring ``schema`` up to date; return the versions this call applied (empty when already current)."""
    queries = Queries(schema)
    done: list[int] = []
    async with conn.transaction():
        await conn.execute(queries.migrate_lock, f"eventbus.migrate.{schema}")
        await conn.execute(queries.migrate_prepare)
        applied = await _applied(conn, queries)
        for migration in migrations(schema):
            if migration.version in applied:
                continue
            await conn.execute(migration.sql)
            await conn.execute(queries.migrate_record, migration.version, migration.name)
            done.append(migration.version)
    return done


async def check_migrations(conn: Connection, schema: str = "eventbus") -> None:
    """Raise :class:`MigrationsMissing` unless every migration of this package is applied to ``schema``."""
    missing = await pending_migrations(conn, schema)
    if missing:
        raise MigrationsMissing(
            f"schema {schema!r} lacks eventbus migrations {missing}; run `eventbus migrate --schema {schema}` "
            "or create the bus with EventBus(..., migrate=True)"
        )
