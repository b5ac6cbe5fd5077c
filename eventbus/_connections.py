"""Finds the asyncpg connection behind what a caller passes to ``publish`` and checks it is in a transaction.

Accepts an asyncpg connection (or pool proxy) and, without importing SQLAlchemy, its ``AsyncConnection`` or
``AsyncSession`` on the asyncpg driver.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import asyncpg.pool

from ._typing import Connection
from .errors import ConfigurationError, NotInTransaction

__all__ = ["transactional_connection"]

_FIX = (
    "publish inside a transaction: `async with conn.transaction(): await bus.publish(event, connection=conn)`, "
    "or use `async with bus.transaction() as tx: await tx.publish(event)`"
)


async def transactional_connection(connection: Any) -> Connection:
    """The asyncpg connection to offer on; raises :class:`NotInTransaction` outside a transaction."""
    if isinstance(connection, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy):
        raw: Any = connection
    elif type(connection).__module__.startswith("sqlalchemy"):
        raw = await _from_sqlalchemy(connection)
    else:
        raise ConfigurationError(
            f"cannot publish on {type(connection).__qualname__}: pass an asyncpg connection, or a SQLAlchemy "
            "AsyncConnection / AsyncSession that uses the asyncpg driver"
        )
    if not raw.is_in_transaction():
        raise NotInTransaction(f"the connection passed to publish is not inside a transaction; {_FIX}")
    return raw  # type: ignore[no-any-return]


async def _from_sqlalchemy(connection: Any) -> Any:
    if hasattr(connection, "get_bind") and hasattr(connection, "connection"):  # AsyncSession
        connection = await connection.connection()
    if not connection.in_transaction():
        raise NotInTransaction(f"the SQLAlchemy connection is not inside a transaction; {_FIX}")
    fairy = await connection.get_raw_connection()
    driver = fairy.driver_connection
    if not isinstance(driver, asyncpg.Connection):
        raise ConfigurationError(
            f"SQLAlchemy uses the {type(driver).__module__} driver here; eventbus needs asyncpg: "
            "create the engine with a 'postgresql+asyncpg://' URL"
        )
    if not driver.is_in_transaction():
        # SQLAlchemy opens the driver's transaction lazily, at the first statement.
        await connection.exec_driver_sql("SELECT 1")
    return driver
