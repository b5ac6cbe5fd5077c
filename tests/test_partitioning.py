"""The partitioned outbox layout (``eventbus migrate --partitioning``): the conversion of a populated outbox,
with producers and a relay running; idempotency keys across partitions; settled partitions made ahead by the
relay and dropped by retention; claims that never read the settled history."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import anyio
import asyncpg
import msgspec
import pytest
from logins import Logins, as_role

from eventbus import Context, Envelope, EventBus, NewEvent, OutboxRepository, RelayConfig, Settlement, Status
from eventbus.errors import ConfigurationError
from eventbus.migrations import latest_version, migrate, pending_migrations, pending_sql
from eventbus.sql import quote_schema

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct, frozen=True):
    n: int


def _history_sql(schema: str, rows: int) -> str:
    """``rows`` relayed rows with UUIDv7 ids from a day ago."""
    return f"""
        INSERT INTO {quote_schema(schema)}.eventbus_outbox (id, event_id, topic, payload, status, attempts,
                                                           idempotency_key)
        SELECT u, u, 'Order', '{{"n": 0}}'::jsonb, 2, 1, CASE WHEN i % 1000 = 0 THEN 'old-' || i END
        FROM (SELECT i, (lpad(to_hex((extract(epoch FROM now() - interval '1 day') * 1000)::bigint + i / 10), 12, '0')
                         || '7' || substr(md5(i::text), 1, 3) || '8' || substr(md5(i::text), 4, 15))::uuid AS u
              FROM generate_series(1, {rows}) AS i) AS ids
    """


async def _where(conn: asyncpg.Connection, schema: str) -> Counter[tuple[str, int]]:
    """Rows by (partition, status)."""
    rows = await conn.fetch(f"SELECT tableoid::regclass::text AS t, status FROM {quote_schema(schema)}.eventbus_outbox")
    return Counter((row["t"].split(".")[-1], row["status"]) for row in rows)


async def _leaves(conn: asyncpg.Connection, schema: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits AS i "
        "JOIN pg_class AS c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
        f"{quote_schema(schema)}.eventbus_outbox_settled",
    )
    return {row["relname"]: row["bound"] for row in rows}


def _relayed(batch: list[Envelope]) -> Settlement:
    """Every row of ``batch`` settled as relayed."""
    done = Settlement()
    for envelope in batch:
        done.mark(envelope, Status.RELAYED)
    return done


def _periodic(where: Counter[tuple[str, int]]) -> int:
    """How many relayed rows lie in the history and the partitions of a period (not the default partition)."""
    return sum(n for (table, status), n in where.items()
               if status == 2 and table.startswith(("eventbus_outbox_history", "eventbus_outbox_settled_2")))


async def _made_ahead(conn: asyncpg.Connection, schema: str) -> int:
    """How many settled partitions of a period there are."""
    return len([name for name in await _leaves(conn, schema) if name.startswith("eventbus_outbox_settled_2")])


async def test_conversion_moves_what_is_live_and_keeps_keys_taken(eventbus_dsn: str, eventbus_schema: str) -> None:
    conn = await asyncpg.connect(eventbus_dsn)
    pool = await asyncpg.create_pool(eventbus_dsn, min_size=1, max_size=2)
    try:
        await conn.execute(_history_sql(eventbus_schema, 2000))
        outbox = OutboxRepository(pool, eventbus_schema)
        async with pool.acquire() as c, c.transaction():
            await outbox.offer(c, [NewEvent(topic="Order", payload=b'{"n": 1}', idempotency_key=f"k{i}")
                                   for i in range(6)])  # fmt: skip
        claimed = await outbox.claim(2, 30.0, "w1")
        assert len(claimed) == 2
        plan = await pending_sql(conn, eventbus_schema, partitioning="daily")
        assert [m.version for m in plan] == [0] and "ATTACH PARTITION" in plan[0].sql

        assert await migrate(conn, eventbus_schema, partitioning="daily") == [0]
        assert await migrate(conn, eventbus_schema, partitioning="daily") == []
        assert await pending_sql(conn, eventbus_schema, partitioning="daily") == []

        where = await _where(conn, eventbus_schema)
        assert where == {("eventbus_outbox_history", 2): 2000, ("eventbus_outbox_live", 1): 2,
                         ("eventbus_outbox_live", 0): 4}  # fmt: skip
        leaves = await _leaves(conn, eventbus_schema)
        assert "eventbus_outbox_settled_default" in leaves and len(leaves) == 4  # history, default, two days ahead

        # The claimed rows keep their lease: the relay that holds them settles them.
        assert await outbox.settle("w1", _relayed(claimed)) == 2
        assert (await _where(conn, eventbus_schema))[("eventbus_outbox_live", 1)] == 0

        # A key is taken whether its row is pending, settled before the conversion, or settled after it.
        async with pool.acquire() as c, c.transaction():
            again = await outbox.offer(c, [
                NewEvent(topic="Order", payload=b'{"n": 2}', idempotency_key=key)
                for key in ("k0", "k5", "old-1000", "new")
            ])  # fmt: skip
        assert [row_id is not None for row_id in again.ids] == [False, False, False, True]
        assert await outbox.partitioned()
    finally:
        await pool.close()
        await conn.close()


async def test_claims_read_only_the_live_partition(eventbus_dsn: str, eventbus_schema: str) -> None:
    """On 200,000 settled rows: the claim's plan scans the live partition's index and nothing else."""
    conn = await asyncpg.connect(eventbus_dsn, server_settings={"jit": "off"})
    pool = await asyncpg.create_pool(eventbus_dsn, min_size=1, max_size=2)
    try:
        await conn.execute(_history_sql(eventbus_schema, 200_000))
        await migrate(conn, eventbus_schema, partitioning="hourly")
        outbox = OutboxRepository(pool, eventbus_schema)
        async with pool.acquire() as c, c.transaction():
            await outbox.offer(c, [NewEvent(topic="Order", payload=b'{"n": 1}') for _ in range(500)])
        for _ in range(3):  # settled rows in the hour's partition too
            batch = await outbox.claim(100, 30.0, "w1")
            await outbox.settle("w1", _relayed(batch))
        await conn.execute(f"ANALYZE {quote_schema(eventbus_schema)}.eventbus_outbox")
        async with conn.transaction():
            plan = "\n".join(
                row[0] for row in await conn.fetch(
                    "EXPLAIN (ANALYZE, COSTS OFF) " + outbox.queries.claim, 100, "w1", 30.0, None, None, None, None,
                    None,
                )
            )  # fmt: skip
            await conn.execute("ROLLBACK; BEGIN")
        scans = [line for line in plan.splitlines() if " Scan " in line and " on " in line]
        scanned = {line.split(" on ")[1].split()[0] for line in scans}
        assert {t for t in scanned if t.startswith("eventbus_outbox")} == {"eventbus_outbox_live"}, plan
        assert "eventbus_outbox_live_pending_tenants" in plan
        assert (await _where(conn, eventbus_schema))[("eventbus_outbox_live", 0)] == 200
    finally:
        await pool.close()
        await conn.close()


async def test_conversion_with_producers_and_a_relay_running(eventbus_dsn: str, eventbus_schema: str) -> None:
    """Producers publish and a relay delivers while the outbox is converted: every event is handled once."""
    conn = await asyncpg.connect(eventbus_dsn)
    await conn.execute(_history_sql(eventbus_schema, 50_000))
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=RelayConfig(poll_interval=0.05))
    handled: Counter[int] = Counter()

    @bus.subscribe(name="orders")
    async def record(event: Order) -> None:
        await anyio.sleep(0.001)
        handled[event.n] += 1

    published: list[int] = []
    stop = anyio.Event()

    async def produce(first: int) -> None:
        n = first
        while not stop.is_set():
            async with bus.transaction() as tx:
                await tx.publish(Order(n), idempotency_key=f"p{n}" if n % 3 == 0 else None)
                await tx.publish(Order(n + 1))
            published.extend((n, n + 1))
            n += 2
            await anyio.sleep(0.002)

    try:
        async with bus:
            async with anyio.create_task_group() as producers:
                producers.start_soon(produce, 0)
                producers.start_soon(produce, 1_000_000)
                await anyio.sleep(1.0)
                before = len(published)
                assert await migrate(conn, eventbus_schema, partitioning="daily") == [0]
                await anyio.sleep(1.0)
                stop.set()
            assert len(published) > before + 20  # producers went on after the conversion
            await bus.drain(timeout=60)
        assert set(handled) == set(published)
        assert [n for n, times in handled.items() if times != 1] == []
        where = await _where(conn, eventbus_schema)
        assert where[("eventbus_outbox_live", 0)] == where[("eventbus_outbox_live", 1)] == 0
        # Rows settle into the history, whose range reaches the first boundary after now, and past that boundary
        # (a test running over midnight, UTC) into the partitions made ahead.
        assert _periodic(where) == 50_000 + len(published)
    finally:
        await conn.close()


async def test_relay_makes_partitions_ahead_and_retention_drops_old_ones(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    conn = await asyncpg.connect(eventbus_dsn)
    schema = quote_schema(eventbus_schema)
    try:
        await conn.execute(_history_sql(eventbus_schema, 1000))
        await migrate(conn, eventbus_schema, partitioning="hourly")
        # Undo what the conversion made ahead: the relay makes it again.
        for name in await _leaves(conn, eventbus_schema):
            if name.startswith("eventbus_outbox_settled_2"):
                await conn.execute(f"DROP TABLE {schema}.{name}")
        await conn.execute(f"UPDATE {schema}.eventbus_layout SET settled_upto = settled_upto - interval '2 hours'")
        # Relayed rows whose ids lie beyond every partition made land in the default partition: one 30 hours
        # ahead stays there, one 90 minutes ahead moves to its hour's partition when the relay makes it.
        now_ms = int((await conn.fetchval("SELECT extract(epoch FROM now())")) * 1000)
        strays = [uuid.UUID(int=((now_ms + ahead) << 80) | (0x7 << 76) | (0x2 << 62)) for ahead in (30 * 3600_000,
                                                                                                   90 * 60_000)]
        for stray in strays:
            await conn.execute(f"INSERT INTO {schema}.eventbus_outbox (id, event_id, topic, payload, status) "
                               "VALUES ($1, $1, 'Order', '{}', 2)", stray)  # fmt: skip
        assert (await _where(conn, eventbus_schema))[("eventbus_outbox_settled_default", 2)] == 2

        config = RelayConfig(poll_interval=0.05, retention_interval=0.1)
        bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=config)
        handled: list[int] = []

        @bus.subscribe(name="orders")
        async def record(event: Order) -> None:
            handled.append(event.n)

        async with bus:
            with anyio.fail_after(20):
                while await _made_ahead(conn, eventbus_schema) < 2:  # noqa: ASYNC110 (the relay's upkeep announces nothing)
                    await anyio.sleep(0.05)
            async with bus.transaction() as tx:
                await tx.publish_many([Order(n) for n in range(10)])
            await bus.drain(timeout=30)
        assert sorted(handled) == list(range(10))
        where = await _where(conn, eventbus_schema)
        assert where[("eventbus_outbox_settled_default", 2)] == 1
        hour = datetime.fromtimestamp(now_ms / 1000 + 90 * 60, UTC).strftime("%Y%m%d%H")
        assert where[(f"eventbus_outbox_settled_{hour}", 2)] == 1
        assert _periodic(where) == 1000 + 10 + 1

        # Retention: partitions all older than the cutoff go whole (here: a cutoff 3 hours ahead, so the history
        # and this hour's partition are past it); the default partition is purged row by row.
        pool = await asyncpg.create_pool(eventbus_dsn, min_size=1, max_size=2)
        try:
            outbox = OutboxRepository(pool, eventbus_schema)
            await conn.execute(f"ANALYZE {schema}.eventbus_outbox")
            await outbox.purge(timedelta(hours=-3))
            await outbox.purge(timedelta(hours=-40))
        finally:
            await pool.close()
        left = await _leaves(conn, eventbus_schema)
        assert "eventbus_outbox_history" not in left and "eventbus_outbox_settled_default" in left
        assert await _where(conn, eventbus_schema) == Counter()
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.eventbus_idempotency_keys") == 0
    finally:
        await conn.close()


async def test_roles_keep_their_rights_and_limits_after_the_conversion(
    eventbus_dsn: str, eventbus_schema: str, logins: Logins
) -> None:
    """Roles made before the conversion: a producer still writes its own tenant's rows only (and takes keys it
    has no privilege on the key table for); the relay delivers every tenant and runs the partitions' upkeep.
    A policy of the user's own on the plain outbox is kept whole."""
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        await conn.execute(f"CREATE POLICY no_13 ON {quote_schema(eventbus_schema)}.eventbus_outbox AS RESTRICTIVE "
                           "FOR INSERT TO PUBLIC WITH CHECK ((payload ->> 'n') IS DISTINCT FROM '13')")  # fmt: skip
        await migrate(conn, eventbus_schema, partitioning="daily")
    finally:
        await conn.close()
    producer = EventBus(as_role(eventbus_dsn, logins.producer["acme"]), schema=eventbus_schema, migrate=False,
                        relay=False, tenant="acme")  # fmt: skip
    async with producer:
        async with producer.transaction() as tx:
            assert await tx.publish(Order(1), idempotency_key="once") is not None
        async with producer.transaction() as tx:
            assert await tx.publish(Order(2), idempotency_key="once") is None
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with producer.transaction() as tx:
                await tx.publish(Order(3), tenant="beta")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with producer.transaction() as tx:
                await tx.publish(Order(13))
    by_hand = await asyncpg.connect(as_role(eventbus_dsn, logins.producer["acme"]))
    try:
        await by_hand.execute("SELECT set_config('eventbus.tenant', 'beta', false)")
        assert await by_hand.fetchval(f"SELECT count(*) FROM {quote_schema(eventbus_schema)}.eventbus_outbox") == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await by_hand.fetchval(f"SELECT count(*) FROM {quote_schema(eventbus_schema)}.eventbus_outbox_live")
    finally:
        await by_hand.close()

    relay = EventBus(as_role(eventbus_dsn, logins.relay), schema=eventbus_schema, migrate=False)
    seen: list[tuple[str, int]] = []

    @relay.subscribe(name="orders")
    async def record(event: Order, ctx: Context) -> None:
        seen.append((ctx.tenant, event.n))

    async with relay:
        async with relay.transaction(tenant="beta") as tx:
            await tx.publish(Order(4))
        await relay.drain(timeout=30)
        assert await relay.outbox.extend() == 0  # made ahead already
        await relay.outbox.purge(timedelta(days=-2))  # drops the history, with the rows just settled
    assert sorted(seen) == [("acme", 1), ("beta", 4)]
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        assert await _where(conn, eventbus_schema) == Counter()
        assert "eventbus_outbox_history" not in await _leaves(conn, eventbus_schema)
    finally:
        await conn.close()


async def test_statements_meeting_rows_moved_by_a_settle_are_tried_again(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """A settle moves its rows out of the live partition; a renew or reclaim that read them before that commit
    finds them gone to another partition, which PostgreSQL reports as a serialization failure (SQLSTATE 40001).
    Several relays renewing, reclaiming and settling the same rows at once: no call fails, every row settles."""
    conn = await asyncpg.connect(eventbus_dsn)
    pool = await asyncpg.create_pool(eventbus_dsn, min_size=4, max_size=12)
    try:
        await migrate(conn, eventbus_schema, partitioning="daily")
        outbox = OutboxRepository(pool, eventbus_schema)
        total = 6000
        async with pool.acquire() as c, c.transaction():
            for _ in range(total // 1000):
                await outbox.offer(c, [NewEvent(topic="Order", payload=b'{"n": 1}') for _ in range(1000)])
        failures: list[BaseException] = []

        async def guarded(call: Awaitable[object]) -> None:
            try:
                await call
            except Exception as exc:  # anything: the test counts them
                failures.append(exc)

        async def race_settle(worker: str, lease: float, batch: list[Envelope]) -> None:
            """Renews and reclaims of ``batch``'s rows, over and over, while they settle."""
            settled = anyio.Event()
            done = _relayed(batch)

            async def race(call: Callable[[], Awaitable[object]]) -> None:
                while not settled.is_set():
                    await guarded(call())

            async def settle() -> None:
                await anyio.sleep(0.002)
                await guarded(outbox.settle(worker, done))
                settled.set()

            async with anyio.create_task_group() as racing:
                for _ in range(2):
                    racing.start_soon(race, lambda: outbox.renew(worker, [e.id for e in batch], lease))
                    racing.start_soon(race, outbox.reclaim)
                racing.start_soon(settle)

        async def relay(worker: str, lease: float) -> None:
            while batch := await outbox.claim(50, lease, worker):
                await race_settle(worker, lease, batch)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as relays:
                for n in range(4):
                    relays.start_soon(relay, f"w{n}", 0.01 if n % 2 else 30.0)  # short leases: reclaims race settles
        assert failures == []
        where = await _where(conn, eventbus_schema)
        assert where[("eventbus_outbox_live", 0)] == where[("eventbus_outbox_live", 1)] == 0
        assert sum(where.values()) == total
    finally:
        await pool.close()
        await conn.close()


async def test_partitions_are_made_in_utc_whatever_the_session_time_zone(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """Days are UTC days: a session in a zone that changes to summer time (Europe/Berlin, 28 March 2027) makes
    the same contiguous partitions as one in UTC."""
    conn = await asyncpg.connect(eventbus_dsn, server_settings={"timezone": "Europe/Berlin"})
    schema = quote_schema(eventbus_schema)
    try:
        await migrate(conn, eventbus_schema, partitioning="daily")
        for name in await _leaves(conn, eventbus_schema):
            if name.startswith("eventbus_outbox_settled_2"):
                await conn.execute(f"DROP TABLE {schema}.{name}")
        upto = "2027-03-27 00:00:00+00"
        await conn.execute(f"ALTER TABLE {schema}.eventbus_outbox_settled DETACH PARTITION "
                           f"{schema}.eventbus_outbox_history")  # fmt: skip
        await conn.execute(f"ALTER TABLE {schema}.eventbus_outbox_settled ATTACH PARTITION "
                           f"{schema}.eventbus_outbox_history FOR VALUES FROM (MINVALUE) TO "
                           f"({schema}.eventbus_min_id('{upto}'))")  # fmt: skip
        await conn.execute(f"UPDATE {schema}.eventbus_layout SET settled_upto = '{upto}'")
        assert await conn.fetchval(f"SELECT {schema}.eventbus_outbox_extend('2027-03-30 12:00+00')") == 4
        leaves = await _leaves(conn, eventbus_schema)
        bounds = {name: leaves[name] for name in leaves if name.startswith("eventbus_outbox_settled_2")}
        assert sorted(bounds) == [f"eventbus_outbox_settled_202703{day}" for day in (27, 28, 29, 30)]
        starts = [await conn.fetchval(f"SELECT {schema}.eventbus_min_id('2027-03-{day} 00:00+00')")
                  for day in (27, 28, 29, 30, 31)]  # fmt: skip
        for day, (start, stop) in zip((27, 28, 29, 30), itertools.pairwise(starts), strict=True):
            assert bounds[f"eventbus_outbox_settled_202703{day}"] == f"FOR VALUES FROM ('{start}') TO ('{stop}')"
        assert str(await conn.fetchval(f"SELECT settled_upto AT TIME ZONE 'UTC' FROM {schema}.eventbus_layout")) == (
            "2027-03-31 00:00:00")
    finally:
        await conn.close()


async def test_an_operator_reads_the_status_of_a_partitioned_outbox(
    eventbus_dsn: str, eventbus_schema: str, logins: Logins, capsys: pytest.CaptureFixture[str]
) -> None:
    from eventbus.cli import main

    conn = await asyncpg.connect(eventbus_dsn)
    try:
        await migrate(conn, eventbus_schema, partitioning="hourly")
    finally:
        await conn.close()
    argv = ["status", "--dsn", as_role(eventbus_dsn, logins.operator["acme"]), "--schema", eventbus_schema,
            "--tenant", "acme", "--json"]  # fmt: skip
    assert await anyio.to_thread.run_sync(main, argv) == 0
    status = msgspec.json.decode(capsys.readouterr().out)
    assert status["layout"]["partitioning"] == "hourly"


async def test_a_relay_running_through_the_conversion_keeps_the_partitions_made(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """A relay started on the plain layout learns of the conversion and makes the settled partitions ahead."""
    conn = await asyncpg.connect(eventbus_dsn)
    schema = quote_schema(eventbus_schema)
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=RelayConfig(retention_interval=0.1))

    @bus.subscribe(name="orders")
    async def record(event: Order) -> None:
        pass

    try:
        async with bus:
            await anyio.sleep(0.3)  # the relay's upkeep has looked at the plain layout
            await migrate(conn, eventbus_schema, partitioning="hourly")
            for name in await _leaves(conn, eventbus_schema):
                if name.startswith("eventbus_outbox_settled_2"):
                    await conn.execute(f"DROP TABLE {schema}.{name}")
            await conn.execute(f"UPDATE {schema}.eventbus_layout SET settled_upto = settled_upto - interval '2 hours'")
            with anyio.fail_after(20):
                while await _made_ahead(conn, eventbus_schema) < 2:  # noqa: ASYNC110 (the upkeep announces nothing)
                    await anyio.sleep(0.05)
    finally:
        await conn.close()


async def _settle_all(outbox: OutboxRepository) -> int:
    settled = 0
    while batch := await outbox.claim(100, 30.0, "w1"):
        settled += await outbox.settle("w1", _relayed(batch))
    return settled


async def test_keys_last_while_their_rows_are_pending_and_leave_no_index_behind(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """Retention forgets a key taken before its window only once its row left the live partition; a key it forgot
    can be taken again by a row that then settles among the history rows holding it (no index of the plain layout
    is left to refuse that)."""
    conn = await asyncpg.connect(eventbus_dsn)
    pool = await asyncpg.create_pool(eventbus_dsn, min_size=1, max_size=2)
    schema = quote_schema(eventbus_schema)
    try:
        await conn.execute(_history_sql(eventbus_schema, 2000))
        await migrate(conn, eventbus_schema, partitioning="daily")
        outbox = OutboxRepository(pool, eventbus_schema)
        async with pool.acquire() as c, c.transaction():
            await outbox.offer(c, [NewEvent(topic="Order", payload=b'{"n": 1}', idempotency_key="later", delay=86400)])
        await conn.execute(f"UPDATE {schema}.eventbus_idempotency_keys SET created_at = now() - interval '3 days'")
        await outbox.purge(timedelta(days=1))
        keys = await conn.fetch(f"SELECT idempotency_key FROM {schema}.eventbus_idempotency_keys")
        assert [k["idempotency_key"] for k in keys] == ["later"]  # the settled history's keys are gone

        async with pool.acquire() as c, c.transaction():
            again = await outbox.offer(c, [NewEvent(topic="Order", payload=b'{"n": 2}', idempotency_key=key)
                                           for key in ("later", "old-1000")])  # fmt: skip
        assert [row_id is not None for row_id in again.ids] == [False, True]
        assert await _settle_all(outbox) == 1
        where = await _where(conn, eventbus_schema)
        assert _periodic(where) == 2001 and where[("eventbus_outbox_live", 0)] == 1
    finally:
        await pool.close()
        await conn.close()


async def test_grants_to_roles_whose_names_need_quotes_survive_the_conversion(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    role = f"Rv_{uuid.uuid4().hex[:8]}-App"  # capitals and a dash: a quoted identifier
    conn = await asyncpg.connect(eventbus_dsn)
    schema = quote_schema(eventbus_schema)
    try:
        await conn.execute(f'CREATE ROLE "{role}"')
        await conn.execute(f'GRANT SELECT, INSERT ON {schema}.eventbus_outbox TO "{role}"')
        await migrate(conn, eventbus_schema, partitioning="daily")
        rights = await conn.fetchrow(
            "SELECT has_table_privilege($1, $2, 'INSERT') AS outbox, has_table_privilege($1, $3, 'INSERT') AS keys, "
            "has_table_privilege($1, $2, 'DELETE') AS deletes",
            role, f"{schema}.eventbus_outbox", f"{schema}.eventbus_idempotency_keys",
        )  # fmt: skip
        assert dict(rights) == {"outbox": True, "keys": True, "deletes": False}
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
        await conn.close()


async def test_a_producer_learns_nothing_of_another_tenants_keys(
    eventbus_dsn: str, eventbus_schema: str, logins: Logins
) -> None:
    """Offering a row of another tenant is refused alike whether that tenant has taken its key or not."""
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        await migrate(conn, eventbus_schema, partitioning="daily")
    finally:
        await conn.close()
    beta = EventBus(as_role(eventbus_dsn, logins.producer["beta"]), schema=eventbus_schema, migrate=False,
                    relay=False, tenant="beta")  # fmt: skip
    async with beta, beta.transaction() as tx:
        assert await tx.publish(Order(1), idempotency_key="taken") is not None
    by_hand = await asyncpg.connect(as_role(eventbus_dsn, logins.producer["acme"]))
    insert = (f"INSERT INTO {quote_schema(eventbus_schema)}.eventbus_outbox (id, event_id, tenant, topic, payload, "
              "idempotency_key) VALUES ($1, $1, 'beta', 'Order', '{}', $2)")  # fmt: skip
    try:
        await by_hand.execute("SELECT set_config('eventbus.tenant', 'acme', false)")
        for key in ("taken", "free"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await by_hand.execute(insert, uuid.uuid4(), key)
        await by_hand.execute("SELECT set_config('eventbus.tenant', 'beta', false)")  # claiming to be beta
        for key in ("taken", "free"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await by_hand.execute(insert, uuid.uuid4(), key)
    finally:
        await by_hand.close()


async def test_claimed_rows_keep_their_lease_for_as_long_as_the_conversion_held_their_relay(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """The conversion waits for its lock behind a writer for a second, and the claimed row's renewal waits behind
    the conversion: the lease is a second longer afterwards all the same. A lease that had run out stays so."""
    conn = await asyncpg.connect(eventbus_dsn)
    writer = await asyncpg.connect(eventbus_dsn)
    pool = await asyncpg.create_pool(eventbus_dsn, min_size=1, max_size=3)
    schema = quote_schema(eventbus_schema)
    try:
        outbox = OutboxRepository(pool, eventbus_schema)
        async with pool.acquire() as c, c.transaction():
            await outbox.offer(c, [NewEvent(topic="Order", payload=b'{"n": 1}') for _ in range(2)])
        [claimed] = await outbox.claim(1, 30.0, "w1")
        [expired] = await outbox.claim(1, 0.01, "w2")
        lease_of = f"SELECT claimed_until FROM {schema}.eventbus_outbox WHERE id = $1"
        before, ran_out = await conn.fetchval(lease_of, claimed.id), await conn.fetchval(lease_of, expired.id)

        async def hold() -> None:
            async with writer.transaction():
                await writer.execute(f"LOCK TABLE {schema}.eventbus_outbox IN ROW EXCLUSIVE MODE")
                await anyio.sleep(1.0)

        async def renew() -> None:
            await anyio.sleep(0.3)  # behind the conversion's lock request
            await outbox.renew("w1", [claimed.id], 30.0)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(hold)
            tasks.start_soon(renew)
            await anyio.sleep(0.1)
            await migrate(conn, eventbus_schema, partitioning="daily", lock_timeout=10)
        assert await conn.fetchval(lease_of, claimed.id) - before >= timedelta(seconds=0.85)
        assert await conn.fetchval(lease_of, expired.id) == ran_out
    finally:
        await pool.close()
        await writer.close()
        await conn.close()


async def test_partitioning_needs_every_migration(eventbus_dsn: str, unmigrated_schema: str) -> None:
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        with pytest.raises(ConfigurationError, match="partitioning needs every migration"):
            await migrate(conn, unmigrated_schema, to=5, partitioning="daily")
        with pytest.raises(ConfigurationError, match="partitioning needs every migration"):
            await pending_sql(conn, unmigrated_schema, to=5, partitioning="daily")
        assert await pending_migrations(conn, unmigrated_schema) == list(range(1, latest_version() + 1))
    finally:
        await conn.close()
