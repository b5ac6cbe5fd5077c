"""The driver boundary: DSN passwords never reach a message, and driver errors become eventbus errors."""

from __future__ import annotations

import asyncpg
import pytest

from eventbus import ConfigurationError, DatabaseError, DatabaseUnavailable, EventBus
from eventbus._driver import connect, redact_dsn, translate

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"postgresql://app:{SECRET}@db:5432/orders", "postgresql://app:***@db:5432/orders"),
        (f"postgres://app:{SECRET}@db/orders?sslmode=require", "postgres://app:***@db/orders?sslmode=require"),
        (f"postgresql://app@db/orders?password={SECRET}&sslmode=require",
         "postgresql://app@db/orders?password=***&sslmode=require"),
        (f"host=db user=app password={SECRET} dbname=orders", "host=db user=app password=*** dbname=orders"),
        (f"host=db password = '{SECRET} with space' dbname=orders", "host=db password = *** dbname=orders"),
        (f"cannot reach postgresql://app:{SECRET}@db/x: refused", "cannot reach postgresql://app:***@db/x: refused"),
        ("postgresql://app@db/orders", "postgresql://app@db/orders"),
        (f"postgresql://app:{SECRET}/x@db/orders", "postgresql://app:***@db/orders"),
        (f"postgresql://app:{SECRET}@x@db/orders", "postgresql://app:***@db/orders"),
        (f"host=db sslpassword={SECRET} dbname=orders", "host=db sslpassword=*** dbname=orders"),
    ],
)  # fmt: skip
def test_redact_dsn_hides_every_form_of_password(text: str, expected: str) -> None:
    assert redact_dsn(text) == expected
    assert SECRET not in redact_dsn(text)


async def test_connect_errors_name_the_dsn_without_its_password() -> None:
    with pytest.raises(DatabaseUnavailable) as unreachable:
        await connect(f"postgresql://app:{SECRET}@127.0.0.1:1/none")
    assert "postgresql://app:***@127.0.0.1:1/none" in str(unreachable.value)
    assert isinstance(unreachable.value.__cause__, OSError)
    with pytest.raises(ConfigurationError) as unusable:
        await connect(f"postgresql://app:{SECRET}@127.0.0.1:notaport/none")
    assert SECRET not in str(unusable.value) and "postgresql://app:***@" in str(unusable.value)


async def test_a_refused_statement_becomes_a_database_error(eventbus_dsn: str) -> None:
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        with pytest.raises(asyncpg.PostgresError) as caught:
            await conn.execute("SELECT * FROM no_such_table_anywhere")
    finally:
        await conn.close()
    error = translate(caught.value)
    assert isinstance(error, DatabaseError) and error.sqlstate == "42P01"
    assert error.__cause__ is caught.value
    assert translate(ValueError("not a driver error")) is None


async def test_bus_connect_error_hides_the_password() -> None:
    bus = EventBus(f"postgresql://app:{SECRET}@127.0.0.1:1/none")
    with pytest.raises(DatabaseUnavailable) as caught:
        await bus.connect()
    assert SECRET not in str(caught.value)


async def test_a_password_the_parser_quotes_back_is_hidden_too() -> None:
    with pytest.raises(ConfigurationError) as caught:
        await connect(f"postgresql://app:{SECRET[:4]}/{SECRET[4:]}@127.0.0.1:1/none")
    assert SECRET[:4] not in str(caught.value) and SECRET[4:] not in str(caught.value)


def test_commands_print_no_password(capsys: pytest.CaptureFixture[str]) -> None:
    from eventbus.cli import main

    for dsn in (f"postgresql://app:{SECRET}@127.0.0.1:1/none", f"postgresql://app@127.0.0.1:1/none?password={SECRET}",
                f"host=127.0.0.1 port=1 user=app password={SECRET} dbname=none"):  # fmt: skip
        commands = (["status", "--dsn", dsn], ["--debug", "status", "--dsn", dsn], ["--json", "migrate", "--dsn", dsn])
        for argv in commands:
            assert main(argv) in (2, 3)
            captured = capsys.readouterr()
            assert SECRET not in captured.out + captured.err, argv
