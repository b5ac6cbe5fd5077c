"""The SQL shipped with the package: named queries parse, are used and declare their parameters; identifiers are
validated; migrations build the expected schema once, also when several processes run them at once."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncpg
import pytest

import eventbus
from eventbus import ConfigurationError, EventBus, MigrationsMissing, OutboxRepository, check_migrations, migrate
from eventbus.migrations import latest_version, pending_migrations
from eventbus.sql import Queries, migrations, partitioned_layout, quote_schema

pytestmark = pytest.mark.anyio

QUERY_NAMES = sorted(Queries("eventbus").by_name)
PACKAGE = Path(eventbus.__file__).parent

EXPECTED_TABLES = {
    "eventbus_dead_letters",
    "eventbus_inbox",
    "eventbus_migrations",
    "eventbus_outbox",
    "eventbus_partitions",
    "eventbus_relays",
    "eventbus_tenant_roles",
    "eventbus_subscriptions",
}
EXPECTED_INDEXES = {
    "eventbus_dead_letters_id_brin",
    "eventbus_dead_letters_pkey",
    "eventbus_dead_letters_reason",
    "eventbus_dead_letters_unreplayed_events",
    "eventbus_inbox_pkey",
    "eventbus_tenant_roles_pkey",
    "eventbus_inbox_processed_brin",
    "eventbus_migrations_pkey",
    "eventbus_outbox_id_brin",
    "eventbus_outbox_idempotency",
    "eventbus_outbox_in_flight",
    "eventbus_outbox_pending_targets",
    "eventbus_outbox_pending_events",
    "eventbus_outbox_pending_tenants",
    "eventbus_outbox_pkey",
    "eventbus_partitions_pkey",
    "eventbus_relays_pkey",
    "eventbus_subscriptions_pkey",
}


def _statements(sql: str) -> list[str]:
    """Split a query body on statement-ending semicolons (the file has no semicolons inside literals)."""
    return [part.strip() for part in re.split(r";\s*(?:\n|$)", sql) if part.strip()]


@pytest.fixture
async def conn(eventbus_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(eventbus_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def fresh_schema(eventbus_dsn: str) -> AsyncIterator[str]:
    """A schema name that does not exist yet (dropped afterwards, whatever the test created)."""
    schema = f"m_{uuid.uuid4().hex[:12]}"
    yield schema
    connection = await asyncpg.connect(eventbus_dsn)
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {quote_schema(schema)} CASCADE")
    finally:
        await connection.close()


def test_queries_file_is_not_empty() -> None:
    assert {"offer", "claim", "settle", "reclaim", "migrate_lock"} <= set(QUERY_NAMES)
    for name in QUERY_NAMES:
        query = Queries("eventbus").by_name[name]
        assert query.sql, f"query {name} has no body"
        assert query.purpose, f"query {name} has no line of purpose"
        assert "__schema__" not in query.sql


#: Queries of the partitioned outbox layout only (their tables exist once it is converted).
_PARTITIONED = {"outbox_layout", "outbox_set_period", "outbox_extend", "outbox_drop_settled", "outbox_purge_default",
                "idempotency_purge"}  # fmt: skip


@pytest.mark.parametrize("name", QUERY_NAMES)
async def test_query_parses_with_declared_parameters(name: str, conn: asyncpg.Connection, eventbus_schema: str) -> None:
    if name in _PARTITIONED:
        await migrate(conn, eventbus_schema, partitioning="daily")
    query = Queries(eventbus_schema).by_name[name]
    statements = _statements(query.sql)
    if len(statements) > 1:
        # Several statements run through the simple protocol, which takes no parameters.
        assert query.declared_params == 0, f"{name} has several statements but declares parameters"
    counts = []
    async with conn.transaction():  # prepared DDL is never executed, but keep the database untouched anyway
        for statement in statements:
            prepared = await conn.prepare(statement)
            counts.append(len(prepared.get_parameters()))
    assert max(counts) == query.declared_params, (
        f"{name} uses {max(counts)} parameters but declares {query.declared_params}"
    )


def _package_source() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py")))


@pytest.mark.parametrize("name", QUERY_NAMES)
def test_query_is_used(name: str) -> None:
    source = _package_source()
    # `queries.<name>`, or another attribute access `.<name>` that is not a method call.
    assert re.search(rf"\bqueries\.{name}\b", source) or re.search(rf"\.{name}\b(?!\s*\()", source), (
        f"query {name!r} in queries.sql is used nowhere in eventbus/"
    )


BAD_NAMES = ["Bad-Name", "x;drop", "", "a b", 'a"b', "1abc", "Upper", "x" * 55, "public; DROP TABLE t"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_unknown_schema_name_is_rejected(name: str) -> None:
    with pytest.raises(ConfigurationError, match="schema name"):
        quote_schema(name)
    with pytest.raises(ConfigurationError):
        Queries(name)
    with pytest.raises(ConfigurationError):
        migrations(name)
    with pytest.raises(ConfigurationError):
        EventBus("postgresql://unused", schema=name)


async def test_bad_schema_name_never_reaches_the_database(conn: asyncpg.Connection) -> None:
    schemas_before = await conn.fetchval("SELECT count(*) FROM pg_namespace")
    for name in ("x;drop", "Bad-Name"):
        with pytest.raises(ConfigurationError):
            await migrate(conn, name)
        with pytest.raises(ConfigurationError):
            await check_migrations(conn, name)
        with pytest.raises(ConfigurationError):
            OutboxRepository(None, name)  # type: ignore[arg-type]
    assert await conn.fetchval("SELECT count(*) FROM pg_namespace") == schemas_before


def test_good_schema_names_are_quoted() -> None:
    assert quote_schema("eventbus") == '"eventbus"'
    assert quote_schema("_t1") == '"_t1"'
    assert quote_schema("x" * 54) == f'"{"x" * 54}"'


async def _schema_objects(conn: asyncpg.Connection, schema: str) -> tuple[set[str], dict[str, str]]:
    tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)}
    indexes = {
        r["indexname"]: r["indexdef"]
        for r in await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", schema)
    }
    return tables, indexes


async def test_concurrent_migrations_apply_each_version_once(eventbus_dsn: str, fresh_schema: str) -> None:
    versions = [m.version for m in migrations(fresh_schema)]
    assert versions == sorted(set(versions)) and versions[-1] == latest_version()
    connections = [await asyncpg.connect(eventbus_dsn) for _ in range(5)]
    applied: list[list[int]] = []
    try:

        async def run(connection: asyncpg.Connection) -> None:
            applied.append(await migrate(connection, fresh_schema))

        async with anyio.create_task_group() as tg:
            for connection in connections:
                tg.start_soon(run, connection)
    finally:
        for connection in connections:
            await connection.close()

    assert len(applied) == 5
    assert sorted(v for run_versions in applied for v in run_versions) == versions, (
        f"each migration must be applied by exactly one of the concurrent runs: {applied}"
    )
    assert sum(1 for run_versions in applied if run_versions) == 1, "the first run applies all, the rest nothing"

    conn = await asyncpg.connect(eventbus_dsn)
    try:
        recorded = await conn.fetch(
            f"SELECT version, name FROM {quote_schema(fresh_schema)}.eventbus_migrations ORDER BY version"
        )
        assert [(r["version"], r["name"]) for r in recorded] == [(m.version, m.name) for m in migrations(fresh_schema)]
        tables, indexes = await _schema_objects(conn, fresh_schema)
        assert tables == EXPECTED_TABLES
        assert set(indexes) == EXPECTED_INDEXES
        assert "WHERE (status = 0)" in indexes["eventbus_outbox_pending_events"]
        assert "WHERE (status = 1)" in indexes["eventbus_outbox_in_flight"]
        assert "USING brin" in indexes["eventbus_outbox_id_brin"]
        assert "UNIQUE" in indexes["eventbus_outbox_idempotency"]

        assert await migrate(conn, fresh_schema) == [], "a second run applies nothing"
        assert await pending_migrations(conn, fresh_schema) == []
        await check_migrations(conn, fresh_schema)
        assert len(await conn.fetch(f"SELECT 1 FROM {quote_schema(fresh_schema)}.eventbus_migrations")) == len(versions)
        assert await _schema_objects(conn, fresh_schema) == (tables, indexes)
    finally:
        await conn.close()


async def test_check_migrations_on_empty_schema_says_how_to_migrate(
    conn: asyncpg.Connection, fresh_schema: str
) -> None:
    # A schema that does not exist at all, then one that exists but is empty.
    with pytest.raises(MigrationsMissing, match="eventbus migrate"):
        await check_migrations(conn, fresh_schema)
    await conn.execute(f"CREATE SCHEMA {quote_schema(fresh_schema)}")
    with pytest.raises(MigrationsMissing, match="eventbus migrate") as excinfo:
        await check_migrations(conn, fresh_schema)
    assert fresh_schema in str(excinfo.value)
    assert await pending_migrations(conn, fresh_schema) == [m.version for m in migrations(fresh_schema)]
    tables, _ = await _schema_objects(conn, fresh_schema)
    assert tables == set(), "checking must not create anything"


def test_a_schema_name_holding_the_period_placeholder_stays_itself() -> None:
    sql = partitioned_layout("a__period__", "day")
    assert '"a__period__".eventbus_outbox' in sql and '"aday"' not in sql
