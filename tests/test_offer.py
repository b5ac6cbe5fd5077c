"""Offering events: one round trip per batch, producer idempotency, the commit-time wake-up notification,
publishing through SQLAlchemy, and the dead-letter repository."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec
import pytest
from letters import dead_letter
from listening import Listener
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from eventbus import (
    DeadLetterFilter,
    EventBus,
    NewEvent,
    NotInTransaction,
    Reason,
    Status,
    id_time,
    new_id,
)
from eventbus.sql import quote_schema

pytestmark = pytest.mark.anyio


class OrderPlaced(msgspec.Struct, frozen=True):
    order_id: str
    total_cents: int


def _event(n: int = 0, **fields: Any) -> NewEvent:
    return NewEvent(topic="OrderPlaced", payload=b'{"order_id": "o-%d", "total_cents": %d}' % (n, n), **fields)


async def _count(bus: EventBus, where: str = "true", *args: Any) -> int:
    table = f"{quote_schema(bus.schema)}.eventbus_outbox"
    return int(await bus.pool.fetchval(f"SELECT count(*) FROM {table} WHERE {where}", *args))


# -- one round trip ------------------------------------------------------------------------------------------


async def test_offer_of_a_thousand_events_is_one_statement(bus: EventBus) -> None:
    events = [_event(n, key=f"k-{n % 7}", headers={"n": str(n)}) for n in range(1000)]
    logged: list[str] = []

    def log(record: Any) -> None:
        logged.append(record.query)

    async with bus.pool.acquire() as conn, conn.transaction():
        # asyncpg looks up the array types (uuid[], smallint[], float8[]) once per connection; warm that up so
        # only the offer's own statements are counted. The logger is added after BEGIN and removed before COMMIT.
        await bus.outbox.offer(conn, [_event(-1), _event(-2)])
        await conn.execute(f"DELETE FROM {quote_schema(bus.schema)}.eventbus_outbox")
        conn.add_query_logger(log)
        try:
            result = await bus.outbox.offer(conn, events)
        finally:
            conn.remove_query_logger(log)
    assert len(logged) == 1, f"offer took {len(logged)} statements"
    assert logged[0] == bus.outbox.queries.offer
    assert len(result.ids) == 1000 and result.duplicates == 0
    assert len(set(result.inserted)) == 1000
    table = f"{quote_schema(bus.schema)}.eventbus_outbox"
    stored = await bus.pool.fetch(f"SELECT id, payload::text AS payload, key FROM {table}")
    assert {r["id"] for r in stored} == set(result.inserted)
    by_id = {r["id"]: r for r in stored}
    for n, row_id in enumerate(result.ids):
        assert row_id is not None
        assert msgspec.json.decode(by_id[row_id]["payload"]) == {"order_id": f"o-{n}", "total_cents": n}
        assert by_id[row_id]["key"] == f"k-{n % 7}"
    assert list(result.ids) == sorted(result.inserted), "ids are UUIDv7 in offer order"


# -- idempotency keys ----------------------------------------------------------------------------------------


async def test_repeated_idempotency_key_inserts_nothing(bus: EventBus) -> None:
    async with bus.transaction() as tx:
        first = await tx.publish(OrderPlaced("o-1", 1), idempotency_key="order-1")
    async with bus.transaction() as tx:
        again = await tx.publish(OrderPlaced("o-1", 999), idempotency_key="order-1")
        other = await tx.publish(OrderPlaced("o-2", 2), idempotency_key="order-2")
    assert first is not None and other is not None
    assert again is None
    assert await _count(bus, "idempotency_key = $1", "order-1") == 1
    row = await bus.outbox.get(first)
    assert row is not None and msgspec.json.decode(row["payload"])["total_cents"] == 1
    assert await _count(bus) == 2


async def test_repeated_idempotency_key_within_one_batch(bus: EventBus) -> None:
    async with bus.transaction() as tx:
        result = await tx.offer(
            [
                _event(1, idempotency_key="dup"),
                _event(2, idempotency_key="dup"),
                _event(3),
                _event(4, idempotency_key="dup"),
                _event(5, idempotency_key="dup", tenant="acme"),
            ]
        )
    first, second, plain, third, other_tenant = result.ids
    assert first is not None and plain is not None and other_tenant is not None
    assert second is None and third is None
    assert result.duplicates == 2
    assert await _count(bus) == 3
    assert await _count(bus, "idempotency_key = 'dup'") == 2
    row = await bus.outbox.get(first)
    assert row is not None and msgspec.json.decode(row["payload"])["order_id"] == "o-1", "the first offer wins"


async def test_same_idempotency_key_in_another_tenant_inserts(bus: EventBus) -> None:
    async with bus.transaction() as tx:
        a = await tx.publish(OrderPlaced("o-1", 1), idempotency_key="k", tenant="acme")
    async with bus.transaction() as tx:
        b = await tx.publish(OrderPlaced("o-1", 1), idempotency_key="k", tenant="globex")
        a_again = await tx.publish(OrderPlaced("o-1", 1), idempotency_key="k", tenant="acme")
    assert a is not None and b is not None and a != b
    assert a_again is None
    tenants = await bus.pool.fetch(
        f"SELECT tenant FROM {quote_schema(bus.schema)}.eventbus_outbox WHERE idempotency_key = 'k' ORDER BY tenant"
    )
    assert [r["tenant"] for r in tenants] == ["acme", "globex"]


async def test_rolled_back_idempotency_key_can_be_used_again(bus: EventBus) -> None:
    with pytest.raises(RuntimeError):
        async with bus.transaction() as tx:
            assert await tx.publish(OrderPlaced("o-1", 1), idempotency_key="k") is not None
            raise RuntimeError("abort")
    async with bus.transaction() as tx:
        assert await tx.publish(OrderPlaced("o-1", 1), idempotency_key="k") is not None
    assert await _count(bus) == 1


# -- the commit notification ---------------------------------------------------------------------------------


async def test_one_notification_per_committing_transaction(bus: EventBus, listener: Listener) -> None:
    assert bus.outbox.channel == listener.channel
    async with bus.transaction() as tx:
        await tx.offer([_event(n) for n in range(50)])
        for n in range(5):
            await tx.publish(OrderPlaced(f"o-{n}", n))
        assert await listener.settle() == 0, "notified before commit"
    assert await listener.wait_for(1) == 1, "one commit with many events and offers must notify once"
    assert listener.received == [(listener.channel, "")]



async def test_without_spacing_every_committing_transaction_notifies(
    eventbus_dsn: str, eventbus_schema: str, listener: Listener
) -> None:
    async with EventBus(eventbus_dsn, schema=eventbus_schema, wake_spacing=0) as bus:
        for batch in range(3):
            async with bus.transaction() as tx:
                await tx.offer([_event(n) for n in range(10 + batch)])
                await tx.publish(OrderPlaced(f"o-{batch}", batch))
        assert await listener.wait_for(3) == 3
        assert (bus.outbox.waker.carried, bus.outbox.waker.sent) == (3, 0)


async def test_no_notification_after_rollback(bus: EventBus, listener: Listener) -> None:
    with pytest.raises(RuntimeError):
        async with bus.transaction() as tx:
            await tx.offer([_event(n) for n in range(10)])
            raise RuntimeError("abort")
    assert await listener.settle() == 0
    assert await _count(bus) == 0


async def test_no_notification_when_every_event_is_delayed(bus: EventBus, listener: Listener) -> None:
    async with bus.transaction() as tx:
        await tx.offer([_event(n, delay=3600) for n in range(5)])
        await tx.publish(OrderPlaced("o-1", 1), delay=timedelta(minutes=5))
    assert await listener.settle() == 0
    assert await _count(bus, "available_at > now()") == 6

    async with bus.transaction() as tx:  # one due event among delayed ones wakes the relays
        await tx.offer([_event(1, delay=3600), _event(2), _event(3, delay=3600)])
    assert await listener.wait_for(1) == 1


async def test_single_event_offer_notifies_once_and_quiet_bus_never(
    bus: EventBus, listener: Listener, eventbus_dsn: str
) -> None:
    async with bus.transaction() as tx:  # single events take the array-free statement
        assert await tx.publish(OrderPlaced("o-1", 1)) is not None
        assert await tx.publish(OrderPlaced("o-2", 2), idempotency_key="k") is not None
        assert await tx.publish(OrderPlaced("o-2", 2), idempotency_key="k") is None
    assert await listener.wait_for(1) == 1

    async with EventBus(eventbus_dsn, schema=bus.schema, notify=False) as quiet, quiet.transaction() as tx:
        await tx.publish(OrderPlaced("o-3", 3))
        await tx.offer([_event(7), _event(8)])
    assert await listener.settle() == 1  # still only the first one
    assert await _count(bus) == 5


async def test_no_notification_when_every_event_is_a_duplicate(bus: EventBus, listener: Listener) -> None:
    async with bus.transaction() as tx:
        await tx.publish(OrderPlaced("o-1", 1), idempotency_key="k")
    assert await listener.wait_for(1) == 1
    async with bus.transaction() as tx:
        assert await tx.publish(OrderPlaced("o-1", 1), idempotency_key="k") is None
    assert await listener.settle() == 1


# -- SQLAlchemy ----------------------------------------------------------------------------------------------


def sqlalchemy_url(dsn: str) -> URL:
    """The DSN as a SQLAlchemy asyncpg URL; a socket directory given as ``?host=`` becomes the host."""
    url = make_url(dsn).set(drivername="postgresql+asyncpg")
    if url.host is None and "host" in url.query:
        url = url.set(host=url.query["host"]).difference_update_query(["host"])
    return url


def test_sqlalchemy_url_handles_both_dsn_forms() -> None:
    socket = sqlalchemy_url("postgresql://postgres:@/postgres?host=/tmp/some/dir")
    assert (socket.drivername, socket.host, socket.database, socket.username) == (
        "postgresql+asyncpg",
        "/tmp/some/dir",
        "postgres",
        "postgres",
    )
    assert "host" not in socket.query
    tcp = sqlalchemy_url("postgresql://postgres@127.0.0.1:5432/test")
    assert (tcp.host, tcp.port, tcp.database, tcp.username) == ("127.0.0.1", 5432, "test", "postgres")


@pytest.fixture
async def engine(eventbus_dsn: str, bus: EventBus) -> AsyncIterator[AsyncEngine]:
    created = create_async_engine(sqlalchemy_url(eventbus_dsn))
    orders = f"{quote_schema(bus.schema)}.orders"
    await bus.pool.execute(f"CREATE TABLE {orders} (id text PRIMARY KEY)")
    try:
        yield created
    finally:
        await created.dispose()


async def _orders(bus: EventBus) -> list[str]:
    rows = await bus.pool.fetch(f"SELECT id FROM {quote_schema(bus.schema)}.orders ORDER BY id")
    return [r["id"] for r in rows]


async def test_publish_on_sqlalchemy_connection_commits_with_it(bus: EventBus, engine: AsyncEngine) -> None:
    insert = text(f"INSERT INTO {quote_schema(bus.schema)}.orders (id) VALUES (:id)")
    async with engine.connect() as conn:
        async with conn.begin():
            await conn.execute(insert, {"id": "o-1"})
            row_id = await bus.publish(OrderPlaced("o-1", 1), connection=conn, key="o-1")
            assert row_id is not None
            assert await bus.outbox.get(row_id) is None, "visible before the caller's commit"
        row = await bus.outbox.get(row_id)
        assert row is not None and row["status"] == Status.PENDING and row["key"] == "o-1"

        trans = await conn.begin()
        await conn.execute(insert, {"id": "o-2"})
        rolled_back = await bus.publish(OrderPlaced("o-2", 2), connection=conn)
        await trans.rollback()
    assert rolled_back is not None and await bus.outbox.get(rolled_back) is None
    assert await _orders(bus) == ["o-1"]
    assert await _count(bus) == 1


async def test_publish_on_sqlalchemy_session_commits_with_it(bus: EventBus, engine: AsyncEngine) -> None:
    insert = text(f"INSERT INTO {quote_schema(bus.schema)}.orders (id) VALUES (:id)")
    async with AsyncSession(engine) as session:
        async with session.begin():
            await session.execute(insert, {"id": "o-1"})
            row_id = await bus.publish(OrderPlaced("o-1", 1), connection=session)
            assert row_id is not None and await bus.outbox.get(row_id) is None
        assert await bus.outbox.get(row_id) is not None

        await session.execute(insert, {"id": "o-2"})  # autobegins
        rolled_back = await bus.publish(OrderPlaced("o-2", 2), connection=session)
        await session.rollback()

        fresh = await bus.publish(OrderPlaced("o-3", 3), connection=session)  # publish alone begins it too
        await session.commit()
    assert rolled_back is not None and await bus.outbox.get(rolled_back) is None
    assert fresh is not None and await bus.outbox.get(fresh) is not None
    assert await _orders(bus) == ["o-1"]
    assert await _count(bus) == 2


async def test_sqlalchemy_autocommit_connection_is_not_a_transaction(bus: EventBus, engine: AsyncEngine) -> None:
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    async with autocommit.connect() as conn:
        with pytest.raises(NotInTransaction):
            await bus.publish(OrderPlaced("o-1", 1), connection=conn)
        async with conn.begin():  # SQLAlchemy's begin() opens no database transaction under AUTOCOMMIT
            with pytest.raises(NotInTransaction):
                await bus.publish(OrderPlaced("o-1", 1), connection=conn)
    assert await _count(bus) == 0


async def test_sqlalchemy_connection_outside_a_transaction_is_refused(bus: EventBus, engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        with pytest.raises(NotInTransaction):
            await bus.publish(OrderPlaced("o-1", 1), connection=conn)
    assert await _count(bus) == 0


# -- the dead-letter repository ------------------------------------------------------------------------------


async def _add_letters(bus: EventBus) -> list[Any]:
    specs = [
        (Reason.DELIVERY_FAILED, "billing", "orders.placed", ""),
        (Reason.HANDLER_TIMEOUT, "billing", "orders.placed", ""),
        (Reason.DELIVERY_FAILED, "shipping", "orders.placed", "acme"),
        (Reason.DESERIALIZATION_FAILED, "shipping", "orders.cancelled", "acme"),
        (Reason.HANDLER_MISSING, None, "orders.cancelled", ""),
        (Reason.DUPLICATE_EVENT, "billing", "orders.cancelled", "acme"),
        (Reason.DELIVERY_FAILED, "billing", "orders.placed", "acme"),
    ]
    ids = []
    for n, (reason, subscriber, topic_name, tenant) in enumerate(specs):
        letter_id, _row_id = await dead_letter(
            bus,
            reason=reason,
            event_id=new_id(),
            topic=topic_name,
            payload=b'{"n": %d}' % n,
            subscriber=subscriber,
            key=f"key-{n}",
            tenant=tenant,
            headers={"traceparent": f"tp-{n}"},
            attempts=n,
            error_type="ValueError",
            error=f"failure {n}",
        )
        ids.append(letter_id)
    return ids


async def test_dead_letter_written_and_read(bus: EventBus) -> None:
    event_id = new_id()
    letter_id, row_id = await dead_letter(
        bus,
        reason=Reason.HANDLER_TIMEOUT,
        event_id=event_id,
        topic="orders.placed",
        payload=b'{"order_id": "o-1"}',
        subscriber="billing",
        key="o-1",
        tenant="acme",
        headers={"traceparent": "00-abc-def-01"},
        attempts=3,
        error_type="TimeoutError",
        error="x" * 10_000,
    )
    letter = await bus.dead_letters.get(letter_id)
    assert letter is not None
    assert (letter.id, letter.reason, letter.event_id, letter.subscriber, letter.key, letter.tenant) == (
        letter_id,
        "HandlerTimeout",
        event_id,
        "billing",
        "o-1",
        "acme",
    )
    assert letter.outbox_id == row_id
    assert msgspec.json.decode(letter.payload) == {"order_id": "o-1"}
    assert letter.headers == {"traceparent": "00-abc-def-01"}
    assert letter.attempts == 3 and letter.error_type == "TimeoutError"
    assert letter.error is not None and len(letter.error) <= 4096 and letter.error.endswith("[truncated]")
    assert letter.replayed_at is None and letter.replay_count == 0
    assert await bus.dead_letters.get(new_id()) is None


async def test_dead_letter_list_filters(bus: EventBus) -> None:
    ids = await _add_letters(bus)
    newest_first = list(reversed(ids))

    async def listed(**where: Any) -> list[Any]:
        return [d.id for d in await bus.dead_letters.list(DeadLetterFilter(**where))]

    assert await listed() == newest_first
    assert await listed(reason="DeliveryFailed") == [ids[6], ids[2], ids[0]]
    assert await listed(subscriber="shipping") == [ids[3], ids[2]]
    assert await listed(topic="orders.cancelled") == [ids[5], ids[4], ids[3]]
    assert await listed(tenant="acme") == [ids[6], ids[5], ids[3], ids[2]]
    assert await listed(reason="DeliveryFailed", subscriber="billing", tenant="acme") == [ids[6]]
    assert await listed(reason="HandlerMissing", subscriber="billing") == []
    now = datetime.now(UTC)
    assert await listed(since=now - timedelta(minutes=1)) == newest_first
    assert await listed(since=now + timedelta(hours=1)) == []
    assert await listed(until=now - timedelta(hours=1)) == []
    assert await listed(until=now + timedelta(hours=1)) == newest_first
    assert await listed(since=id_time(ids[2]), until=id_time(ids[4])) == [ids[4], ids[3], ids[2]]

    await bus.pool.execute(
        f"UPDATE {quote_schema(bus.schema)}.eventbus_dead_letters SET replayed_at = now(), replay_count = 1 "
        "WHERE id = ANY($1::uuid[])",
        [ids[0], ids[6]],
    )
    assert await listed() == newest_first[1:-1], "replayed letters are hidden by default"
    assert await listed(include_replayed=True) == newest_first
    assert await listed(reason="DeliveryFailed") == [ids[2]]

    with pytest.raises(ValueError, match="unknown reason"):
        DeadLetterFilter(reason="Nope")


async def test_dead_letter_list_pages_with_cursor(bus: EventBus) -> None:
    ids = await _add_letters(bus)
    pages: list[list[Any]] = []
    before = None
    while True:
        page = await bus.dead_letters.list(limit=3, before=before)
        if not page:
            break
        assert len(page) <= 3
        pages.append([d.id for d in page])
        before = page[-1].id
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for page in pages for i in page] == list(reversed(ids))
    filtered = await bus.dead_letters.list(DeadLetterFilter(tenant="acme"), limit=2, before=ids[5])
    assert [d.id for d in filtered] == [ids[3], ids[2]]


async def test_dead_letter_count_and_purge(bus: EventBus) -> None:
    ids = await _add_letters(bus)
    assert await bus.dead_letters.count() == {
        ("DeliveryFailed", "billing"): 2,
        ("DeliveryFailed", "shipping"): 1,
        ("DeserializationFailed", "shipping"): 1,
        ("DuplicateEvent", "billing"): 1,
        ("HandlerMissing", None): 1,
        ("HandlerTimeout", "billing"): 1,
    }
    table = f"{quote_schema(bus.schema)}.eventbus_dead_letters"
    await bus.pool.execute(f"UPDATE {table} SET replayed_at = now() WHERE id = ANY($1::uuid[])", ids[:2])
    counts = await bus.dead_letters.count()
    assert counts[("DeliveryFailed", "billing")] == 1 and ("HandlerTimeout", "billing") not in counts

    assert await bus.dead_letters.purge(timedelta(hours=1), include_unreplayed=True) == 0, "recent ones stay"
    # Ids can run ahead of the clock by a few milliseconds; purge bounds are by id time.
    ahead = (id_time(ids[-1]) - datetime.now(UTC)).total_seconds()
    await anyio.sleep(max(ahead, 0) + 0.01)
    assert await bus.dead_letters.purge(timedelta(0)) == 2, "only replayed letters by default"
    remaining = {d.id for d in await bus.dead_letters.list(DeadLetterFilter(include_replayed=True))}
    assert remaining == set(ids[2:])
    assert await bus.dead_letters.purge(timedelta(0), include_unreplayed=True, batch=2) == 5
    assert await bus.dead_letters.list(DeadLetterFilter(include_replayed=True)) == []
    assert await bus.dead_letters.count() == {}
