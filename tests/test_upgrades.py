"""Upgrades: a database populated under an older migration keeps every row through ``migrate``, and migrations
never queue the outbox's traffic behind a lock they wait for."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest

from eventbus import EventBus, MigrationLocked, RelayConfig
from eventbus.cli import main
from eventbus.events import partition_of
from eventbus.ids import new_id
from eventbus.migrations import latest_version, migrate, pending_migrations
from eventbus.sql import migrations, quote_schema

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.anyio


class Upgraded(msgspec.Struct, frozen=True):
    n: int


@pytest.fixture
def old_schema(unmigrated_schema: str) -> str:
    return unmigrated_schema


async def _populate_version_1(conn: asyncpg.Connection, schema: str) -> dict[str, Any]:
    """What a deployment of the first release holds: pending rows (keyed, unkeyed, targeted, delayed), rows a
    relay that died still claims, published and dead rows, dead letters (one replayed), inbox entries and a
    stale relay."""
    s = quote_schema(schema)
    rows: list[tuple[Any, ...]] = []
    pending: list[int] = []
    for n in range(400):
        status = 0 if n < 250 else 1 if n < 270 else 2 if n < 390 else 3
        key = f"k{n % 7}" if n % 3 else None
        target = "upgraded" if n % 50 == 0 else None
        if status in (0, 1):
            pending.append(n)
        rows.append((
            new_id(), new_id(), "Upgraded", key, partition_of(key), target,
            msgspec.json.encode({"n": n}).decode(), status, 1 if status == 1 else 0,
            "relay-of-old" if status == 1 else None,
        ))  # fmt: skip
    await conn.executemany(
        f"""INSERT INTO {s}.eventbus_outbox (id, event_id, topic, key, partition, target, payload, status, attempts,
                                             claimed_by, claimed_until, published_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::smallint, $9, $10,
                    CASE WHEN $8::smallint = 1 THEN now() - interval '1 minute' END,
                    CASE WHEN $8::smallint = 2 THEN now() END)""",
        rows,
    )  # fmt: skip
    letters = []
    for n in range(1000, 1010):
        letters.append((new_id(), "HandlerTimeout" if n % 2 else "DeliveryFailed", new_id(),
                        msgspec.json.encode({"n": n}).decode(), 3, n == 1009))  # fmt: skip
    await conn.executemany(
        f"""INSERT INTO {s}.eventbus_dead_letters (id, reason, event_id, topic, subscriber, payload, attempts, error,
                                                   replayed_at, replay_count)
            VALUES ($1, $2, $3, 'Upgraded', 'upgraded', $4::jsonb, $5, 'boom', CASE WHEN $6 THEN now() END,
                    CASE WHEN $6 THEN 1 ELSE 0 END)""",
        letters,
    )  # fmt: skip
    await conn.executemany(
        f"INSERT INTO {s}.eventbus_inbox (subscriber, event_id, payload_hash) VALUES ('other', $1, '\\x00')",
        [(new_id(),) for _ in range(50)],
    )
    await conn.execute(
        f"INSERT INTO {s}.eventbus_relays (worker, hostname, pid, heartbeat_at) "
        "VALUES ('relay-of-old', 'old-host', 1, now() - interval '1 hour')"
    )
    return {"pending": pending, "letters": 10}


async def test_a_database_populated_under_migration_1_upgrades_and_keeps_every_row(
    eventbus_dsn: str, old_schema: str
) -> None:
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        assert await migrate(conn, old_schema, to=1) == [1]
        made = await _populate_version_1(conn, old_schema)
        assert await migrate(conn, old_schema) == list(range(2, latest_version() + 1))
        assert await pending_migrations(conn, old_schema) == []
        s = quote_schema(old_schema)
        assert await conn.fetchval(f"SELECT count(*) FROM {s}.eventbus_outbox") == 400
        assert await conn.fetchval(f"SELECT count(*) FROM {s}.eventbus_inbox") == 50
    finally:
        await conn.close()

    bus = EventBus(eventbus_dsn, schema=old_schema, stop_timeout=1,
                   relay_config=RelayConfig(poll_interval=0.05, heartbeat_interval=0.2, lease=5.0))  # fmt: skip
    handled: list[int] = []

    @bus.subscribe(name="upgraded")
    async def upgraded(event: Upgraded) -> None:
        handled.append(event.n)

    async with bus:
        with anyio.fail_after(30):
            while sorted(set(handled)) != made["pending"]:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        letters = await bus.dead_letters.list()
        assert len(letters) == made["letters"] - 1, "the replayed letter is not listed"
        assert (await bus.dead_letters.replay(ids=[letters[0].id])).count == 1
        with anyio.fail_after(30):
            while not set(handled) & set(range(1000, 1010)):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await bus.drain(30)
    assert sorted(handled)[: len(made["pending"])] == made["pending"], "each old pending or claimed row once"
    assert len(handled) == len(made["pending"]) + 1


#: The tables every schema has had since the first migration.
TABLES = ("eventbus_outbox", "eventbus_dead_letters", "eventbus_inbox", "eventbus_relays")


async def _write_every_table(conn: asyncpg.Connection, schema: str) -> None:
    """The lock an INSERT or UPDATE takes, on every eventbus table (a producer's, a relay's), in a transaction."""
    async with conn.transaction():
        for table in TABLES:
            await conn.execute(f"LOCK TABLE {quote_schema(schema)}.{table} IN ROW EXCLUSIVE MODE")


async def _hold_write_locks(dsn: str, schema: str, held: anyio.Event, release: anyio.Event) -> None:
    """An open transaction that writes every eventbus table: an ALTER TABLE or a CREATE INDEX on any must wait for
    it to end."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            for table in TABLES:
                await conn.execute(f"LOCK TABLE {quote_schema(schema)}.{table} IN ROW EXCLUSIVE MODE")
            held.set()
            await release.wait()
    finally:
        await conn.close()


async def test_a_migration_behind_a_long_transaction_never_queues_the_tables_traffic(
    eventbus_dsn: str, old_schema: str
) -> None:
    """A waiting ALTER TABLE or CREATE INDEX blocks every later write to its table. With a lock timeout the
    migration gives way and tries again, so a writer (a producer, a relay) waits at most that long, and the
    migration is applied once the long transaction ends."""
    conn = await asyncpg.connect(eventbus_dsn)
    reader = await asyncpg.connect(eventbus_dsn)
    held, release = anyio.Event(), anyio.Event()
    applied: list[int] = []
    try:
        await migrate(conn, old_schema, to=latest_version() - 1)

        async def run_migration() -> None:
            applied.extend(await migrate(conn, old_schema, lock_timeout=0.2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(_hold_write_locks, eventbus_dsn, old_schema, held, release)
            await held.wait()
            tg.start_soon(run_migration)
            await anyio.sleep(0.5)
            await reader.execute("SET lock_timeout = '1s'")
            for _ in range(5):  # each would wait for the long transaction behind a queued ALTER TABLE
                await _write_every_table(reader, old_schema)
                await anyio.sleep(0.1)
            assert applied == []
            release.set()
        assert applied == [latest_version()]
    finally:
        await reader.close()
        await conn.close()


async def test_a_migration_that_never_gets_its_lock_says_what_holds_it_up(eventbus_dsn: str, old_schema: str) -> None:
    conn = await asyncpg.connect(eventbus_dsn)
    held, release = anyio.Event(), anyio.Event()
    try:
        await migrate(conn, old_schema, to=latest_version() - 1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_hold_write_locks, eventbus_dsn, old_schema, held, release)
            await held.wait()
            with pytest.raises(MigrationLocked, match="pg_stat_activity"):
                await migrate(conn, old_schema, lock_timeout=0.1, give_up_after=1.0)
            release.set()
        assert await pending_migrations(conn, old_schema) == [latest_version()], "rolled back whole"
    finally:
        await conn.close()


def test_migrate_dry_run_prints_the_sql_and_applies_nothing(
    eventbus_dsn: str, old_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--dsn", eventbus_dsn, "--schema", old_schema]
    assert main(["migrate", "--dry-run", *common]) == 0
    shown = capsys.readouterr().out
    assert "-- 0001_initial" in shown and "CREATE TABLE" in shown and f'"{old_schema}".eventbus_outbox' in shown
    newest = migrations(old_schema)[-1]
    assert f"-- {newest.version:04d}_{newest.name}" in shown
    assert main(["migrate", "--dry-run", "--json", *common]) == 0
    listed = msgspec.json.decode(capsys.readouterr().out)
    assert [m["name"] for m in listed["pending"]] == [f"{m.version:04d}_{m.name}" for m in migrations(old_schema)]
    assert main(["status", *common]) == 2, "nothing was applied: not even the schema is there"
    assert "not found" in capsys.readouterr().err
    # The printed script, run as it is, migrates as `eventbus migrate` would.
    asyncio.run(_execute(eventbus_dsn, shown))
    assert main(["migrate", "--dry-run", *common]) == 0
    assert "no migration would run" in capsys.readouterr().out
    assert main(["migrate", "--dry-run", "--partitioning", "daily", *common]) == 0
    asyncio.run(_execute(eventbus_dsn, capsys.readouterr().out))
    assert main(["migrate", "--partitioning", "daily", "--json", *common]) == 0
    assert msgspec.json.decode(capsys.readouterr().out)["applied"] == []
    assert main(["status", *common]) == 0
    assert "layout     partitioned (daily)" in capsys.readouterr().out
    assert main(["migrate", "--dry-run", "--partitioning", "hourly", *common]) == 0
    asyncio.run(_execute(eventbus_dsn, capsys.readouterr().out))
    assert main(["status", *common]) == 0
    assert "layout     partitioned (hourly)" in capsys.readouterr().out


async def _execute(dsn: str, script: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(script)
        assert not conn.is_in_transaction(), "the script commits"
    finally:
        await conn.close()


def _release_before(into: Path) -> str:
    """Extract the package as it was before its newest migration was added (from git) into ``into``; return the
    commit it comes from."""
    newest = migrations("eventbus")[-1]
    path = f"eventbus/sql/migrations/{newest.version:04d}_{newest.name}.sql"

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True).stdout

    added = git("log", "-1", "--diff-filter=A", "--format=%H", "--", path).decode().strip()
    try:
        commit = git("rev-parse", "--verify", f"{added}^" if added else "HEAD").decode().strip()  # uncommitted: HEAD
    except subprocess.CalledProcessError:
        pytest.skip("needs the repository's git history: a shallow clone lacks the release before")
    archive = git("archive", "--format=tar", commit, "eventbus")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    assert not (into / path).exists(), f"the release before {newest.name} has no {path}"
    return commit


def _spawn_relay(env: dict[str, str], tree: Path) -> subprocess.Popen[bytes]:
    """``eventbus relay`` of tests/apps/rolling.py, run from ``tree`` (its package comes first on the path)."""
    with (tree / "old-relay.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "eventbus.cli", "relay", "--app", "tests.apps.rolling:bus"],
            env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def test_the_release_before_keeps_working_beside_this_one_on_the_migrated_schema(
    eventbus_dsn: str, old_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling deploy: the schema is migrated by this release, while the release before still publishes and
    relays. Its producer and its relay, beside a relay of this release, deliver every event once."""
    commit = _release_before(tmp_path)
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        await migrate(conn, old_schema)
        s = quote_schema(old_schema)
        await conn.execute(f"CREATE TABLE {s}.effects (event_id uuid PRIMARY KEY, n int NOT NULL, pid int)")
        # The release before runs from its own tree: it comes first on the path, the tests' app after it.
        env = {**os.environ, "ROLLING_DSN": eventbus_dsn, "ROLLING_SCHEMA": old_schema, "PYTHONPATH": str(ROOT)}
        old_relay = _spawn_relay(env, tmp_path)
        try:
            monkeypatch.setenv("ROLLING_DSN", eventbus_dsn)
            monkeypatch.setenv("ROLLING_SCHEMA", old_schema)
            from apps import rolling

            async with rolling.bus:
                old_producer = await anyio.run_process(
                    [sys.executable, "-m", "tests.apps.rolling", "0", "150"], env=env, cwd=tmp_path, check=False
                )
                assert old_producer.returncode == 0, old_producer.stderr.decode()[-2000:]
                await rolling.publish(150, 150)
                with anyio.fail_after(60):
                    while await conn.fetchval(f"SELECT count(*) FROM {s}.effects") < 300:  # noqa: ASYNC110
                        await anyio.sleep(0.1)
                await rolling.bus.drain(30)
                await anyio.sleep(0.5)
            pids = await conn.fetch(f"SELECT pid, count(*) FROM {s}.effects GROUP BY pid")
        finally:
            old_relay.send_signal(signal.SIGTERM)
            code = old_relay.wait(timeout=30)
        assert code == 0, (tmp_path / "old-relay.log").read_text()[-3000:]
        ns = [r["n"] for r in await conn.fetch(f"SELECT n FROM {s}.effects ORDER BY n")]
        assert ns == list(range(300)), "every event once, from either release's producer"
        assert {r["pid"] for r in pids} >= {old_relay.pid}, f"the release before ({commit[:8]}) delivered some"
    finally:
        await conn.close()


def test_contract_steps_run_only_when_asked_and_once(
    eventbus_dsn: str, old_schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a migration keeps for the release before it (0007 keeps the index its relays claim through) goes only
    with ``eventbus migrate --contract``."""

    async def indexes() -> set[str]:
        conn = await asyncpg.connect(eventbus_dsn)
        try:
            rows = await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1", old_schema)
            return {r["indexname"] for r in rows}
        finally:
            await conn.close()

    common = ["--dsn", eventbus_dsn, "--schema", old_schema]
    assert main(["migrate", *common]) == 0
    assert "eventbus migrate --contract" in capsys.readouterr().out
    assert {"eventbus_outbox_pending_events", "eventbus_outbox_pending_tenants"} <= anyio.run(indexes)
    assert main(["migrate", "--dry-run", "--contract", *common]) == 0
    shown = capsys.readouterr().out
    assert "-- 0007_fair_claims (contract)" in shown and "DROP INDEX" in shown
    assert main(["migrate", "--contract", "--json", *common]) == 0
    assert msgspec.json.decode(capsys.readouterr().out)["applied"] == ["0007_fair_claims (contract)"]
    found = anyio.run(indexes)
    assert "eventbus_outbox_pending_events" not in found and "eventbus_outbox_pending_tenants" in found
    assert main(["migrate", "--contract", "--json", *common]) == 0
    assert msgspec.json.decode(capsys.readouterr().out)["applied"] == [], "once"
    assert main(["status", *common]) == 0, "a contracted schema is up to date"
