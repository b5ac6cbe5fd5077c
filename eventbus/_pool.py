"""The bus's connection pool: fewer round trips per transaction and per internal statement.

asyncpg's pool resets every connection it takes back (advisory locks, cursors, LISTENs, settings) with a round
trip of its own. Two cases make that round trip unnecessary:

- A transaction from :meth:`EventBus.transaction` ends with COMMIT; the reset statements are sent in the same
  simple-query message, right after it, and so is the relay wake-up when the bus's :class:`~eventbus._waker.Waker`
  says this COMMIT is to carry one. The wake-up then runs in a transaction of its own instead of in the user's:
  PostgreSQL serialises committing transactions that notify, through their WAL flush, so a NOTIFY inside the
  user's transaction costs producers a large share of their throughput (BENCHMARKS.md). The wake-up
  transaction commits asynchronously (it writes nothing worth keeping) and skips the notification when the
  queue is half full, so it cannot fail once the user's COMMIT has succeeded.
- The bus's own single statements (claims, settlements, heartbeats) change no session state, so the connection
  goes back to the pool as it came. Each runs in a transaction of its own, so one that failed to serialize
  wrote nothing and is run again.

Whenever the shortcut did not run (an exception, a failed COMMIT, a connection a user acquired), the full reset
runs as asyncpg would run it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import anyio
import asyncpg

if TYPE_CHECKING:
    from ._waker import Waker

__all__ = ["BusConnection", "bus_connection", "create_pool", "fetch", "fetchrow", "fetchval", "execute"]

# What asyncpg's Transaction sends to commit a top-level transaction. If a future asyncpg sends something
# else, the shortcut silently stops applying and the ordinary reset runs (tests/test_pool.py counts the trips).
_COMMIT = "COMMIT;"


def _literal(text: str) -> str:
    """``text`` as an escape-string literal: the same meaning whatever ``standard_conforming_strings`` says."""
    if "\x00" in text:
        raise ValueError("a NUL character cannot reach PostgreSQL in a text value")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


class BusConnection(asyncpg.Connection):
    """An asyncpg connection that can send its reset, and a relay wake-up, in the round trip of its COMMIT."""

    # Class-level defaults: asyncpg's Connection has no __dict__-free contract for subclasses to honour.
    _fold_open: bool = False
    _fold_ready: bool = False
    _waker: Waker | None = None
    _is_reset: bool = False
    _sent: tuple[Counter[Any], list[Any]] | None = None
    _tenant_at_begin: str | None = None

    def open_fold(self) -> None:
        """A bus transaction starts: a later COMMIT may carry the reset (see :meth:`ready_to_commit`)."""
        self._fold_open, self._fold_ready, self._is_reset = True, False, False
        self._waker = None
        self._sent = None

    def begin_as(self, tenant: str | None) -> None:
        """The next BEGIN sets the transaction's tenant (``eventbus.tenant``, until its end) in its own round
        trip; None leaves the session's, which the pool set when it connected."""
        self._tenant_at_begin = tenant

    def count_at_commit(self, counter: Counter[Any], keys: Iterable[Any]) -> None:
        """Add ``keys`` to ``counter`` once the open bus transaction has committed (see :meth:`committed`)."""
        if self._sent is None:
            self._sent = (counter, [])
        self._sent[1].extend(keys)

    def committed(self) -> None:
        """The bus transaction committed: count what it offered."""
        sent, self._sent = self._sent, None
        if sent is not None:
            counter = sent[0]
            for key in sent[1]:
                counter[key] += 1

    @property
    def in_bus_transaction(self) -> bool:
        """Whether a transaction of :meth:`EventBus.transaction` is open (its COMMIT is then folded)."""
        return self._fold_open

    def wake_after_commit(self, waker: Waker) -> None:
        """Wake relays after the open bus transaction commits (not after a rollback), through ``waker``."""
        self._waker = waker

    def ready_to_commit(self) -> None:
        """The transaction body finished without an exception: the next COMMIT carries the reset."""
        self._fold_ready = self._fold_open

    def close_fold(self) -> None:
        self._fold_open = self._fold_ready = False
        self._waker = None
        self._tenant_at_begin = None

    def skip_next_reset(self) -> None:
        """The statements run since the pool handed this connection out left no session state behind."""
        self._is_reset = True

    def take_reset(self) -> bool:
        """Whether the connection is already reset (and forget it: the next release resets again)."""
        done, self._is_reset = self._is_reset, False
        return done

    async def execute(self, query: str, *args: object, timeout: float | None = None) -> str:
        tenant = self._tenant_at_begin
        if tenant is not None and not args and query.startswith("BEGIN"):
            self._tenant_at_begin = None
            query = f"{query} SELECT set_config('eventbus.tenant', {_literal(tenant)}, true);"
            return await super().execute(query, timeout=timeout)
        if not (self._fold_ready and query == _COMMIT and not args):
            return await super().execute(query, *args, timeout=timeout)
        waker = self._waker
        self.close_fold()
        after = self.get_reset_query()
        owed = carried = False
        if waker is not None:
            owed, carried = waker.owed, waker.carry_nowait()
            if carried:
                # Its own implicit transaction, after the user's COMMIT; asynchronous commit is safe for a
                # notification (nothing to keep), and a queue over half full means relays lag: they poll anyway.
                # The simple-query form of the ``wake`` query the waker sends from its own connection.
                after += (
                    " SET LOCAL synchronous_commit TO off;"
                    f" SELECT pg_notify({_literal(waker.channel)}, '') WHERE pg_notification_queue_usage() < 0.5;"
                )
        try:
            status = await super().execute(f"{_COMMIT} {after}", timeout=timeout)
        except asyncpg.PostgresError:
            # The server refused the COMMIT, so nothing was committed; a wake-up this one was to carry is owed.
            if waker is not None and owed:
                waker.owe_nowait()
            raise
        except BaseException:
            if waker is not None:
                waker.owe_nowait()  # whether the COMMIT went through is unknown
            raise
        # Reached only when every statement succeeded: on an error PostgreSQL skips the rest of the message, and
        # the pool's ordinary reset runs on release.
        self._is_reset = True
        if waker is not None and not carried:
            waker.owe_nowait()
        return status


def bus_connection(connection: object) -> BusConnection | None:
    """``connection`` when it is a :class:`BusConnection` or a pool's proxy of one (a proxy forwards every
    attribute to its connection), else None."""
    return cast(BusConnection, connection) if hasattr(connection, "in_bus_transaction") else None


async def _reset(connection: asyncpg.Connection) -> None:
    # asyncpg has already dropped client-side listeners and rolled back an open transaction.
    if isinstance(connection, BusConnection):
        connection.close_fold()
        if connection.take_reset():
            return
    query = connection.get_reset_query()
    if query:
        await connection.execute(query)


async def create_pool(
    dsn: str, *, max_size: int, init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
    tenant: str = "", jit: bool = True, custom_plans: bool = False,
) -> asyncpg.Pool:
    """The bus's pool. Every connection's session has ``tenant`` as its ``eventbus.tenant`` (the row-level
    security policies read it), set in the startup message: no round trip, and the pool's reset (``RESET ALL``)
    brings it back, so a transaction's own tenant never outlives it. ``jit=False`` turns PostgreSQL's JIT
    compilation off for the pool's sessions: the relay's statements touch a few hundred rows, and their cost
    estimates (a claim over every tenant, a settle of a batch) can pass ``jit_above_cost``, where compiling takes
    longer than running. ``custom_plans`` plans every statement for its parameters (``plan_cache_mode``): over a
    partitioned outbox, a cached generic plan of the settle cannot leave partitions out, and took 5.6 ms per 100
    rows against 3.5 ms planned each time."""
    settings = {"eventbus.tenant": tenant}
    if not jit:
        settings["jit"] = "off"
    if custom_plans:
        settings["plan_cache_mode"] = "force_custom_plan"
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=max_size, connection_class=BusConnection, reset=_reset, init=cast(Any, init),
        server_settings=settings,
    )  # fmt: skip
    return pool


@asynccontextmanager
async def _statement(pool: asyncpg.Pool) -> AsyncIterator[Any]:
    """A pooled connection for statements that leave no session state: on success, no reset round trip."""
    async with pool.acquire() as conn:
        yield conn
        _clean(conn)


#: How often a statement that failed to serialize is run again before the failure is the caller's.
SERIALIZATION_TRIES = 8


async def _run(pool: asyncpg.Pool, statement: Callable[[Any], Awaitable[Any]]) -> Any:
    """``statement(conn)``, one statement in a transaction of its own, run again when it fails to serialize
    (SQLSTATE 40001).

    With the partitioned outbox, a settle moves its rows out of the live partition; a statement that read such a
    row before that commit and then locks it (a renew, a reclaim, a claim) cannot follow it to its new
    partition, and PostgreSQL fails the statement instead. It wrote nothing then, and running it again reads
    the rows as they are now: the same as having run a moment later."""
    for tries in range(1, SERIALIZATION_TRIES + 1):
        try:
            async with _statement(pool) as conn:
                return await statement(conn)
        except asyncpg.SerializationError:
            if tries == SERIALIZATION_TRIES:
                raise
            await anyio.sleep(random.uniform(0, 0.001 * 2**tries))  # up to 2 ms, then 4, 8, ...
    raise AssertionError("unreachable")


async def fetch(pool: asyncpg.Pool, query: str, *args: Any) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await _run(pool, lambda conn: conn.fetch(query, *args))
    return rows


async def fetchrow(pool: asyncpg.Pool, query: str, *args: Any) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await _run(pool, lambda conn: conn.fetchrow(query, *args))
    return row


async def fetchval(pool: asyncpg.Pool, query: str, *args: Any) -> Any:
    return await _run(pool, lambda conn: conn.fetchval(query, *args))


async def execute(pool: asyncpg.Pool, query: str, *args: Any) -> str:
    status: str = await _run(pool, lambda conn: conn.execute(query, *args))
    return status


def _clean(conn: object) -> None:
    target = bus_connection(conn)
    if target is not None:
        target.skip_next_reset()
