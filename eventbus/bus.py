"""The facade users touch: ``EventBus`` wires the repository, the relay and the subscribers together."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

import asyncpg
import msgspec

from ._connections import transactional_connection
from ._embedded import embedded_dsn
from ._typing import Connection
from .errors import ConfigurationError, DatabaseUnavailable
from .events import Registry
from .migrations import check_migrations, migrate
from .observability import inject_headers
from .repository import DeadLetterRepository, NewEvent, OfferResult, OutboxRepository

__all__ = ["EventBus", "Transaction"]


def _seconds(delay: float | timedelta | None) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
    if seconds < 0:
        raise ValueError(f"delay must not be negative (got {seconds} s)")
    return seconds


class Transaction:
    """An open database transaction from :meth:`EventBus.transaction`; events published on it commit with it."""

    def __init__(self, bus: EventBus, connection: Connection) -> None:
        self.bus = bus
        self.connection = connection

    async def publish(
        self,
        event: msgspec.Struct,
        *,
        key: str | None = None,
        delay: float | timedelta | None = None,
        idempotency_key: str | None = None,
        headers: dict[str, str] | None = None,
        tenant: str | None = None,
        target: str | None = None,
    ) -> uuid.UUID | None:
        """Offer ``event`` in this transaction; return its id, or None when ``idempotency_key`` was seen before."""
        new = self.bus.encode(
            event, key=key, delay=delay, idempotency_key=idempotency_key, headers=headers, tenant=tenant,
            target=target,
        )  # fmt: skip
        result = await self.bus.outbox.offer(self.connection, [new])
        return result.ids[0]

    async def publish_many(self, events: Sequence[NewEvent]) -> OfferResult:
        """Offer many already-encoded events (see :meth:`EventBus.encode`) in one round trip."""
        return await self.bus.outbox.offer(self.connection, events)


class EventBus:
    """Publish typed events inside your PostgreSQL transaction; deliver them after commit.

    ``dsn``: a PostgreSQL URL. Without one, ``EVENTBUS_DSN`` is used, else an embedded PostgreSQL server is
    started in ``data_dir`` (default ``.eventbus`` in the current directory, or ``EVENTBUS_DATA_DIR``).
    ``schema`` holds eventbus's tables; ``migrate`` applies missing migrations on start (else start fails
    with a message saying how to apply them).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "eventbus",
        tenant: str = "",
        data_dir: str | os.PathLike[str] | None = None,
        migrate: bool = True,
        pool_size: int = 10,
        registry: Registry | None = None,
    ) -> None:
        self._dsn = dsn
        self.schema = schema
        self.tenant = tenant
        self.data_dir = data_dir
        self.migrate = migrate
        self.pool_size = pool_size
        self.registry = registry or Registry()
        self._pool: asyncpg.Pool | None = None
        self._outbox: OutboxRepository | None = None
        self._dead_letters: DeadLetterRepository | None = None
        from .sql import quote_schema

        quote_schema(schema)  # fail at construction, not at start

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def resolve_dsn(self) -> str:
        """The DSN in use: the one given, else ``EVENTBUS_DSN``, else the embedded server's."""
        if self._dsn is None:
            self._dsn = os.environ.get("EVENTBUS_DSN") or await embedded_dsn(
                None if self.data_dir is None else _path(self.data_dir)
            )
        return self._dsn

    async def connect(self) -> None:
        """Open the connection pool and check (or apply) migrations. Idempotent."""
        if self._pool is not None:
            return
        dsn = await self.resolve_dsn()
        try:
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=self.pool_size)
        except (OSError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(
                f"cannot connect to PostgreSQL at {_redacted(dsn)}: {exc}. Check that the server runs and the "
                "DSN (EVENTBUS_DSN or EventBus(dsn)) is right, or leave both unset to use the embedded server"
            ) from exc
        try:
            async with pool.acquire() as conn:
                if self.migrate:
                    await migrate(conn, self.schema)
                else:
                    await check_migrations(conn, self.schema)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._outbox = OutboxRepository(pool, self.schema)
        self._dead_letters = DeadLetterRepository(pool, self.schema)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise ConfigurationError("the bus is not started: use `async with bus:` or `await bus.connect()`")
        return self._pool

    @property
    def outbox(self) -> OutboxRepository:
        self.pool  # noqa: B018 - raises with a clear message when not started
        assert self._outbox is not None
        return self._outbox

    @property
    def dead_letters(self) -> DeadLetterRepository:
        self.pool  # noqa: B018
        assert self._dead_letters is not None
        return self._dead_letters

    # -- publishing ------------------------------------------------------------------------------------------

    def encode(
        self,
        event: msgspec.Struct,
        *,
        key: str | None = None,
        delay: float | timedelta | None = None,
        idempotency_key: str | None = None,
        headers: dict[str, str] | None = None,
        tenant: str | None = None,
        target: str | None = None,
    ) -> NewEvent:
        """Turn an event into the row :meth:`OutboxRepository.offer` inserts (topic, payload, trace context)."""
        return NewEvent(
            topic=self.registry.topic_for(event),
            payload=self.registry.encode(event),
            key=key,
            target=target,
            tenant=self.tenant if tenant is None else tenant,
            headers=inject_headers(dict(headers) if headers else {}),
            delay=_seconds(delay),
            idempotency_key=idempotency_key,
        )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A transaction on a pooled connection: commits on normal exit, rolls back on an exception."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield Transaction(self, conn)

    async def publish(
        self,
        event: msgspec.Struct,
        *,
        connection: Any,
        key: str | None = None,
        delay: float | timedelta | None = None,
        idempotency_key: str | None = None,
        headers: dict[str, str] | None = None,
        tenant: str | None = None,
        target: str | None = None,
    ) -> uuid.UUID | None:
        """Offer ``event`` in the caller's open transaction on ``connection``.

        ``connection``: an asyncpg connection, or a SQLAlchemy ``AsyncConnection``/``AsyncSession`` on asyncpg.
        Returns the row id, or None when ``idempotency_key`` was already used (nothing was inserted).
        Raises :class:`NotInTransaction` when the connection has no open transaction.
        """
        conn = await transactional_connection(connection)
        new = self.encode(
            event, key=key, delay=delay, idempotency_key=idempotency_key, headers=headers, tenant=tenant,
            target=target,
        )  # fmt: skip
        return (await self.outbox.offer(conn, [new])).ids[0]


def _path(value: str | os.PathLike[str]) -> Any:
    from pathlib import Path

    return Path(value)


def _redacted(dsn: str) -> str:
    """The DSN without its password, for error messages."""
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"
