from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import msgspec
import pytest

from eventbus import DeadLetterFilter, EventBus, RelayConfig, Transaction
from eventbus.cli import main


class Ping(msgspec.Struct, frozen=True):
    n: int


@pytest.fixture
def schema(unmigrated_schema: str) -> str:
    return unmigrated_schema


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, object]:
    code = main(argv)
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def test_missing_migrations_then_migrate_then_status(
    eventbus_dsn: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--dsn", eventbus_dsn, "--schema", schema]
    assert main(["status", *common]) == 2  # no such schema: "not found", never "migrate it"
    err = capsys.readouterr().err
    assert "not found" in err and "migrate" not in err
    _sql(eventbus_dsn, f'CREATE SCHEMA "{schema}"')
    assert main(["status", *common]) == 4  # it exists, without eventbus tables: migrating it is the advice
    assert "eventbus migrate" in capsys.readouterr().err
    code, applied = _json(capsys, ["migrate", "--json", *common])
    assert code == 0 and applied["applied"] == [  # type: ignore[index]
        "0001_initial", "0002_partitions", "0003_subscriptions", "0004_observability", "0005_broker",
        "0006_tenants", "0007_fair_claims",
    ]
    code, status = _json(capsys, ["status", "--json", *common])
    assert code == 0
    assert status["outbox"]["pending"] == 0 and status["dead_letters"] == []  # type: ignore[index]


def test_migrate_converts_to_the_partitioned_layout_and_status_says_so(
    eventbus_dsn: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--dsn", eventbus_dsn, "--schema", schema]
    assert main(["migrate", *common]) == 0
    capsys.readouterr()
    assert main(["migrate", "--dry-run", "--partitioning", "hourly", *common]) == 0
    dry = capsys.readouterr().out
    assert "lacks 1 migration(s): partitioned outbox (hourly)." in dry and "ATTACH PARTITION" in dry
    assert dry.rstrip().endswith("COMMIT;")
    assert main(["status", *common]) == 0
    assert "layout" not in capsys.readouterr().out  # the dry run changed nothing
    assert main(["migrate", "--partitioning", "hourly", *common]) == 0
    assert "partitioned outbox (hourly)" in capsys.readouterr().out
    assert main(["status", *common]) == 0
    assert "layout     partitioned (hourly), settled partitions made up to " in capsys.readouterr().out
    code, status = _json(capsys, ["status", "--json", *common])
    assert code == 0 and status["layout"]["partitioning"] == "hourly"  # type: ignore[index]
    assert main(["migrate", "--partitioning", "weekly", *common]) == 2


def _sql(dsn: str, *statements: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    anyio.run(run)


def test_a_mistyped_schema_is_not_found_with_the_nearest_names(
    eventbus_dsn: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--dsn", eventbus_dsn, "--schema", schema]) == 0
    capsys.readouterr()
    typo = schema[:-1] + ("x" if schema[-1] != "x" else "y")
    assert main(["dlq", "list", "--dsn", eventbus_dsn, "--schema", typo]) == 2
    err = capsys.readouterr().err
    assert f"schema {typo!r} not found" in err and "migrate" not in err
    assert f"try `eventbus dlq list --schema {schema}" in err
    code, document = _json(capsys, ["status", "--json", "--dsn", eventbus_dsn, "--schema", typo])
    assert code == 2 and document["error"]["type"] == "ConfigurationError"  # type: ignore[index]


@pytest.mark.parametrize("bad", ["", "pg_catalog", "pg_toast", "information_schema"])
def test_empty_and_system_schemas_are_refused(eventbus_dsn: str, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["status"], ["migrate"], ["dlq", "list"]):
        assert main([*command, "--dsn", eventbus_dsn, "--schema", bad]) == 2
        err = capsys.readouterr().err
        assert ("is empty" if bad == "" else "PostgreSQL's own") in err, err


def test_status_without_a_schema_lists_the_eventbus_schemas_when_the_default_has_none(
    eventbus_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a database of its own, where eventbus tables live in ``orders`` and ``quickstart`` only."""
    database = f"d_{uuid.uuid4().hex[:10]}"
    _sql(eventbus_dsn, f'CREATE DATABASE "{database}"')
    dsn = urlunsplit(urlsplit(eventbus_dsn)._replace(path=f"/{database}"))
    try:
        assert main(["status", "--dsn", dsn]) == 4  # nothing anywhere: migrating is the advice
        assert "eventbus migrate" in capsys.readouterr().err
        for name in ("orders", "quickstart"):
            assert main(["migrate", "--dsn", dsn, "--schema", name]) == 0
        capsys.readouterr()
        assert main(["status", "--dsn", dsn]) == 2
        err = capsys.readouterr().err
        assert "'eventbus' (the default) holds no eventbus tables; schemas that do: orders, quickstart" in err
        assert main(["status", "--dsn", dsn, "--schema", "orders"]) == 0
    finally:
        _sql(eventbus_dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def make_letters(dsn: str, schema: str, publish: Callable[[Transaction], Awaitable[object]]) -> None:
    """Dead letters of a subscriber that always fails, for the events ``publish`` publishes."""

    async def run() -> None:
        bus = EventBus(dsn, schema=schema, relay_config=RelayConfig(poll_interval=0.02))

        @bus.subscribe(max_attempts=1, name="cli.fails")
        async def fails(event: Ping) -> None:
            raise RuntimeError("down")

        async with bus:
            async with bus.transaction() as tx:
                await publish(tx)
            await bus.drain(timeout=30)

    anyio.run(run)


def test_dead_letters_listed_replayed_once(eventbus_dsn: str, schema: str, capsys: pytest.CaptureFixture[str]) -> None:
    make_letters(eventbus_dsn, schema, lambda tx: tx.publish_many([Ping(n) for n in range(3)]))
    common = ["--dsn", eventbus_dsn, "--schema", schema]
    code, listed = _json(capsys, ["dlq", "list", "--json", "--reason", "delivery_failed", *common])
    assert code == 0 and len(listed["dead_letters"]) == 3  # type: ignore[index]
    assert main(["dlq", "list", "--reason", "Nonsense", *common]) == 2
    assert "DeliveryFailed" in capsys.readouterr().err

    code, dry = _json(capsys, ["dlq", "replay", "--dry-run", "--json", *common])
    assert code == 0 and dry == {  # type: ignore[comparison-overlap]
        "dry_run": True, "count": 3, "by_target": [{"reason": "DeliveryFailed", "subscriber": "cli.fails", "count": 3}]
    }  # fmt: skip
    code, done = _json(capsys, ["dlq", "replay", "--json", "--subscriber", "cli.fails", *common])
    assert code == 0 and done["count"] == 3  # type: ignore[index]
    code, again = _json(capsys, ["dlq", "replay", "--json", *common])
    assert code == 0 and again["count"] == 0  # type: ignore[index]

    async def replayed() -> int:
        async with EventBus(eventbus_dsn, schema=schema, relay=False) as bus:
            letters = await bus.dead_letters.list(DeadLetterFilter(include_replayed=True))
            return sum(1 for d in letters if d.replay_count == 1)

    assert anyio.run(replayed) == 3


def test_unreachable_database_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--dsn", "postgresql://postgres@127.0.0.1:1/none"]) == 3
    err = capsys.readouterr().err
    assert "cannot connect" in err and "Traceback" not in err


def test_dead_letter_filters_by_tenant_and_time(
    eventbus_dsn: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def publish(tx: Transaction) -> None:
        await tx.publish_many([Ping(n) for n in range(2)], tenant="acme")
        await tx.publish(Ping(9))

    make_letters(eventbus_dsn, schema, publish)
    common = ["--dsn", eventbus_dsn, "--schema", schema]
    code, acme = _json(capsys, ["dlq", "list", "--json", "--tenant", "acme", *common])
    assert code == 0 and [d["tenant"] for d in acme["dead_letters"]] == ["acme", "acme"]  # type: ignore[index]
    code, default = _json(capsys, ["dlq", "list", "--json", "--tenant", "", *common])
    assert code == 0 and [d["payload"] for d in default["dead_letters"]] == [{"n": 9}]  # type: ignore[index]
    code, recent = _json(capsys, ["dlq", "list", "--json", "--since", "1h", *common])
    assert code == 0 and len(recent["dead_letters"]) == 3  # type: ignore[index]
    code, future = _json(capsys, ["dlq", "list", "--json", "--since", "2999-01-01T00:00", *common])
    assert code == 0 and future["dead_letters"] == []  # type: ignore[index]
    code, old = _json(capsys, ["dlq", "list", "--json", "--until", "1h", *common])
    assert code == 0 and old["dead_letters"] == []  # type: ignore[index]
    code, done = _json(capsys, ["dlq", "replay", "--json", "--tenant", "acme", *common])
    assert code == 0 and done["count"] == 2  # type: ignore[index]
    code, left = _json(capsys, ["dlq", "list", "--json", *common])
    assert code == 0 and [d["tenant"] for d in left["dead_letters"]] == [""]  # type: ignore[index]


def test_errors_are_json_with_json(eventbus_dsn: str, schema: str, capsys: pytest.CaptureFixture[str]) -> None:
    _sql(eventbus_dsn, f'CREATE SCHEMA "{schema}"')  # there, without eventbus tables
    code, document = _json(capsys, ["status", "--json", "--dsn", eventbus_dsn, "--schema", schema])
    assert code == 4
    assert document == {"error": {"message": document["error"]["message"], "type": "MigrationsMissing",  # type: ignore[index]
                                  "exit_code": 4}}  # fmt: skip
    assert "eventbus migrate" in document["error"]["message"]  # type: ignore[index]
    code, document = _json(capsys, ["dlq", "list", "--json", "--since", "yesterday-ish"])
    assert code == 2 and document["error"]["type"] == "UsageError"  # type: ignore[index]
    assert "--since" in document["error"]["message"]  # type: ignore[index]
    code, document = _json(capsys, ["status", "--json", "--dsn", "postgresql://postgres@127.0.0.1:1/none"])
    assert code == 3 and document["error"]["type"] == "DatabaseUnavailable"  # type: ignore[index]
    assert main(["status", "--dsn", "postgresql://postgres@127.0.0.1:1/none"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("eventbus: error: cannot connect")


def test_usage_errors_name_the_command_and_refuse_abbreviations(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "list", "--limit", "0"]) == 2
    assert "see `eventbus dlq list --help`" in capsys.readouterr().err
    assert main(["--js", "status"]) == 2
    assert "unrecognized arguments: --js" in capsys.readouterr().err
    code, document = _json(capsys, ["--json", "dlq"])
    assert code == 2 and document == {"error": {"message": "name a command (see `eventbus dlq --help`)",
                                                "type": "UsageError", "exit_code": 2}}  # fmt: skip


def test_a_timeout_is_a_failure_not_an_unreachable_database() -> None:
    from eventbus.cli import _explain

    assert _explain(TimeoutError("3 events were still pending")) == (1, "3 events were still pending", "TimeoutError")
    assert _explain(PermissionError("no access to app.py"))[0] == 1
    assert _explain(ConnectionResetError("reset by peer"))[:1] == (3,)
