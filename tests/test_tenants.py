"""Tenants isolated by row-level security, with real roles made by the test: a producer inserts for its tenant
only, an operator sees, replays and purges its tenant's dead letters only (through the library and through
hand-written SQL), the relay delivers every tenant's events, and a pooled connection keeps no tenant."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import anyio
import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from logins import TENANTS, Logins, as_role

from eventbus import Context, DeadLetterFilter, EventBus, RelayConfig
from eventbus.ids import new_id
from eventbus.sql import Queries, quote_schema

pytestmark = pytest.mark.anyio

class Billed(msgspec.Struct, frozen=True):
    n: int


async def _letters(dsn: str, schema: str) -> None:
    """Three dead letters per tenant, written by a role that sees every tenant."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            f"""INSERT INTO {quote_schema(schema)}.eventbus_dead_letters
                    (id, reason, event_id, tenant, topic, subscriber, payload, attempts, error)
                VALUES ($1, 'DeliveryFailed', $2, $3, 'Billed', 'billing', $4::jsonb, 5, 'boom')""",
            [(new_id(), new_id(), tenant, msgspec.json.encode({"n": n}).decode())
             for tenant in TENANTS for n in range(3)],
        )  # fmt: skip
    finally:
        await conn.close()


async def test_a_producer_inserts_rows_for_its_own_tenant_only(
    eventbus_dsn: str, eventbus_schema: str, logins: Logins
) -> None:
    producer = EventBus(as_role(eventbus_dsn, logins.producer["acme"]), schema=eventbus_schema, migrate=False,
                        relay=False, tenant="acme")  # fmt: skip
    async with producer:
        async with producer.transaction() as tx:
            await tx.publish(Billed(1))
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with producer.transaction() as tx:
                await tx.publish(Billed(2), tenant="beta")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            async with producer.transaction(tenant="beta") as tx:
                await tx.publish(Billed(3))
    # By hand, through the same role: no setting lets it write or read another tenant's rows.
    conn = await asyncpg.connect(as_role(eventbus_dsn, logins.producer["acme"]))
    s = quote_schema(eventbus_schema)
    insert = (f"INSERT INTO {s}.eventbus_outbox (id, event_id, tenant, topic, payload) "
              "VALUES ($1, $1, $2, 'Billed', '{\"n\": 9}')")  # fmt: skip
    try:
        for setting in ("acme", "beta", ""):
            await conn.execute("SELECT set_config('eventbus.tenant', $1, false)", setting)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(insert, new_id(), "beta")
        await conn.execute("SELECT set_config('eventbus.tenant', 'beta', false)")
        assert await conn.fetchval(f"SELECT count(*) FROM {s}.eventbus_outbox") == 0
        await conn.execute("SELECT set_config('eventbus.tenant', 'acme', false)")
        assert await conn.fetchval(f"SELECT count(*) FROM {s}.eventbus_outbox") == 1
    finally:
        await conn.close()


async def test_the_relay_delivers_every_tenants_events_with_their_tenant(
    eventbus_dsn: str, eventbus_schema: str, logins: Logins
) -> None:
    for tenant in TENANTS:
        producer = EventBus(as_role(eventbus_dsn, logins.producer[tenant]), schema=eventbus_schema, migrate=False,
                            relay=False, tenant=tenant)  # fmt: skip
        async with producer, producer.transaction() as tx:
            await tx.publish_many([Billed(n) for n in range(5)])
    seen: list[tuple[str, int]] = []
    relay = EventBus(as_role(eventbus_dsn, logins.relay), schema=eventbus_schema, migrate=False,
                     relay_config=RelayConfig(poll_interval=0.05))  # fmt: skip

    @relay.subscribe(name="billing")
    async def billing(event: Billed, ctx: Context) -> None:
        seen.append((ctx.tenant, event.n))

    async with relay:
        with anyio.fail_after(20):
            while len(seen) < 10:  # noqa: ASYNC110
                await anyio.sleep(0.05)
    assert sorted(seen) == [(t, n) for t in TENANTS for n in range(5)]


async def test_an_operator_sees_replays_and_purges_its_tenants_dead_letters_only(
    eventbus_dsn: str, eventbus_schema: str, logins: Logins
) -> None:
    await _letters(eventbus_dsn, eventbus_schema)
    operator = EventBus(as_role(eventbus_dsn, logins.operator["acme"]), schema=eventbus_schema, migrate=False,
                        relay=False, tenant="acme")  # fmt: skip
    async with operator:
        listed = await operator.dead_letters.list()
        assert {d.tenant for d in listed} == {"acme"} and len(listed) == 3
        assert await operator.dead_letters.list(DeadLetterFilter(tenant="beta")) == []
        replayed = await operator.dead_letters.replay()
        assert replayed.count == 3
        assert await operator.dead_letters.purge(timedelta(0), include_unreplayed=True) == 3
    # By hand, through the operator's role, whatever it sets.
    conn = await asyncpg.connect(as_role(eventbus_dsn, logins.operator["acme"]))
    s = quote_schema(eventbus_schema)
    try:
        for setting in ("beta", "acme", ""):
            await conn.execute("SELECT set_config('eventbus.tenant', $1, false)", setting)
            assert await conn.fetchval(f"SELECT count(*) FROM {s}.eventbus_dead_letters WHERE tenant = 'beta'") == 0
            assert await conn.execute(f"UPDATE {s}.eventbus_dead_letters SET replay_count = 99") == "UPDATE 0"
            assert await conn.execute(f"DELETE FROM {s}.eventbus_dead_letters") == "DELETE 0"
    finally:
        await conn.close()
    # Beta's letters are all there, untouched, and acme's replays are acme's rows.
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        rows = await conn.fetch(f"SELECT tenant, replay_count FROM {s}.eventbus_dead_letters")
        assert sorted(tuple(r) for r in rows) == [("beta", 0)] * 3
        assert await conn.fetchval(f"SELECT array_agg(DISTINCT tenant) FROM {s}.eventbus_outbox") == ["acme"]
    finally:
        await conn.close()


async def test_the_command_line_acts_as_the_tenant_it_is_given(
    eventbus_dsn: str, eventbus_schema: str, logins: Logins, capsys: pytest.CaptureFixture[str]
) -> None:
    from eventbus.cli import main

    def run(*argv: str) -> int:
        return main(list(argv))

    await _letters(eventbus_dsn, eventbus_schema)
    common = ["--dsn", as_role(eventbus_dsn, logins.operator["beta"]), "--schema", eventbus_schema, "--json"]
    assert await anyio.to_thread.run_sync(run, "dlq", "list", "--tenant", "beta", *common) == 0
    letters = msgspec.json.decode(capsys.readouterr().out)
    assert {d["tenant"] for d in letters["dead_letters"]} == {"beta"} and len(letters["dead_letters"]) == 3
    assert await anyio.to_thread.run_sync(run, "dlq", "list", "--tenant", "acme", *common) == 0
    assert msgspec.json.decode(capsys.readouterr().out)["dead_letters"] == []
    assert await anyio.to_thread.run_sync(run, "status", "--tenant", "beta", *common) == 0
    status = msgspec.json.decode(capsys.readouterr().out)
    assert sum(d["count"] for d in status["dead_letters"]) == 3


async def test_a_pooled_connection_keeps_no_tenant_after_a_tenant_transaction(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay=False, pool_size=1, tenant="home")
    read = "SELECT current_setting('eventbus.tenant', true)"
    async with bus:
        async with bus.transaction(tenant="acme") as tx:
            assert await tx.connection.fetchval(read) == "acme"
            assert tx.tenant == "acme"
        async with bus.transaction() as tx:
            assert await tx.connection.fetchval(read) == "home"
        with pytest.raises(RuntimeError):
            async with bus.transaction(tenant="beta") as tx:
                assert await tx.connection.fetchval(read) == "beta"
                raise RuntimeError("rolled back")
        async with bus.pool.acquire() as conn:
            assert await conn.fetchval(read) == "home"


@st.composite
def _operations(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """(acting role's tenant, the tenant it claims, what it does) in a random order."""
    return draw(st.lists(
        st.tuples(st.sampled_from(TENANTS), st.sampled_from([*TENANTS, "", "gamma"]),
                  st.sampled_from(["publish", "read", "update", "delete"])),
        min_size=1, max_size=12,
    ))  # fmt: skip


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=_operations())
async def test_random_roles_and_tenants_never_cross(
    eventbus_dsn: str, eventbus_schema: str, logins: Logins, operations: list[tuple[str, str, str]]
) -> None:
    """Whatever a producer or an operator role claims to be, it reads and writes its own tenant's rows only."""
    await _check_operations(eventbus_dsn, eventbus_schema, logins, operations)


async def _check_operations(dsn: str, schema: str, logins: Logins, operations: list[tuple[str, str, str]]) -> None:
    s = quote_schema(schema)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f"TRUNCATE {s}.eventbus_outbox, {s}.eventbus_dead_letters")
        await _letters(dsn, schema)
        before = {r["tenant"]: r["n"] for r in await admin.fetch(
            f"SELECT tenant, count(*) AS n FROM {s}.eventbus_dead_letters GROUP BY tenant")}  # fmt: skip
        changed: dict[str, int] = {t: 0 for t in TENANTS}
        for own, claimed, action in operations:
            role = logins.producer[own] if action == "publish" else logins.operator[own]
            conn = await asyncpg.connect(as_role(dsn, role))
            try:
                await conn.execute("SELECT set_config('eventbus.tenant', $1, false)", claimed)
                allowed = claimed == own
                if action == "publish":
                    try:
                        await conn.execute(f"INSERT INTO {s}.eventbus_outbox (id, event_id, tenant, topic, payload) "
                                           "VALUES ($1, $1, $2, 'Billed', '{}')", new_id(), claimed)  # fmt: skip
                        assert allowed, f"{own}'s producer wrote a row for {claimed!r}"
                    except asyncpg.InsufficientPrivilegeError:
                        assert not allowed, f"{own}'s producer could not write its own row"
                elif action == "read":
                    tenants = {r["tenant"] for r in await conn.fetch(f"SELECT tenant FROM {s}.eventbus_dead_letters")}
                    assert tenants <= ({own} if allowed else set()), f"{own}'s operator read {tenants}"
                elif action == "update":
                    status = await conn.execute(f"UPDATE {s}.eventbus_dead_letters SET replay_count = replay_count + 1")
                    assert allowed or status == "UPDATE 0"
                else:
                    status = await conn.execute(f"DELETE FROM {s}.eventbus_dead_letters")
                    assert allowed or status == "DELETE 0"
                    changed[own] += int(status.split()[1])
            finally:
                await conn.close()
        after = {r["tenant"]: r["n"] for r in await admin.fetch(
            f"SELECT tenant, count(*) AS n FROM {s}.eventbus_dead_letters GROUP BY tenant")}  # fmt: skip
        for tenant in TENANTS:
            assert after.get(tenant, 0) == before[tenant] - changed[tenant], "only a tenant's own role deletes its rows"
        foreign = await admin.fetchval(f"SELECT count(*) FROM {s}.eventbus_outbox WHERE tenant NOT IN ('acme', 'beta')")
        assert foreign == 0
    finally:
        await admin.close()


async def test_a_claim_takes_from_every_tenant_with_due_rows_in_turn(eventbus_dsn: str, eventbus_schema: str) -> None:
    """Tenant a's backlog is older than tenant b's three new rows; the first claim of 100 takes b's rows too."""
    s = quote_schema(eventbus_schema)
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        rows = [(new_id(), "a") for _ in range(5000)] + [(new_id(), "b") for _ in range(3)]
        await conn.executemany(f"INSERT INTO {s}.eventbus_outbox (id, event_id, tenant, topic, payload) "
                               "VALUES ($1, $1, $2, 'Billed', '{\"n\": 0}')", rows)  # fmt: skip
        claim = Queries(eventbus_schema).claim
        claimed = await conn.fetch(claim, 100, "relay-1", 30.0, None, None, None, None, None)
        by_tenant = Counter(r["tenant"] for r in claimed)
        assert by_tenant == {"a": 97, "b": 3}
        oldest_a = [r[0] for r in rows[:97]]
        assert sorted(r["id"] for r in claimed if r["tenant"] == "a") == oldest_a, "each tenant's oldest rows"
        again = await conn.fetch(claim, 100, "relay-1", 30.0, None, None, None, None, None)
        assert Counter(r["tenant"] for r in again) == {"a": 100}, "with one tenant left, a full batch of it"
    finally:
        await conn.close()


async def test_one_tenants_backlog_does_not_hold_another_tenants_new_events_back(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    s = quote_schema(eventbus_schema)
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        await conn.executemany(f"INSERT INTO {s}.eventbus_outbox (id, event_id, tenant, topic, payload) "
                               "VALUES ($1, $1, 'a', 'Billed', '{\"n\": 0}')",
                               [(new_id(),) for _ in range(20_000)])  # fmt: skip
    finally:
        await conn.close()
    handled: dict[str, int] = Counter()
    b_seen = anyio.Event()
    bus = EventBus(eventbus_dsn, schema=eventbus_schema, relay_config=RelayConfig(poll_interval=0.05))

    @bus.subscribe(name="billing", concurrency=1)
    async def billing(event: Billed, ctx: Context) -> None:
        handled[ctx.tenant] += 1
        if ctx.tenant == "b":
            b_seen.set()
        else:
            await anyio.sleep(0.001)  # a's backlog takes about 20 s to work through

    async with bus:
        await anyio.sleep(0.5)
        async with bus.transaction(tenant="b") as tx:
            await tx.publish(Billed(1))
        with anyio.fail_after(5):
            await b_seen.wait()
        assert handled["a"] < 15_000, "b's event came long before a's backlog was worked through"


def test_no_two_tenants_share_a_role_name() -> None:
    from eventbus.roles import roles_for

    tenants = ["acme", "Acme", "acme_", "a" * 30, "a" * 31, "ac me", "ac_me", "ac__me"]
    names = [role.name for role in roles_for("orders", tenants)]
    assert len(names) == len(set(names))
    assert "orders_producer_acme" in names and "orders_producer_ac_me" in names


async def test_a_tenant_with_quotes_and_backslashes_is_one_literal(eventbus_dsn: str) -> None:
    """Set with the BEGIN as an escape-string literal: the same text whatever standard_conforming_strings says."""
    from eventbus._pool import bus_connection, create_pool

    tenant = "x\\'); SELECT 1; --"
    read = "SELECT current_setting('standard_conforming_strings'), current_setting('eventbus.tenant', true)"
    pool = await create_pool(eventbus_dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            folded = bus_connection(conn)
            assert folded is not None
            for strings in ("off", "on"):
                await conn.execute(f"SET standard_conforming_strings = {strings}")
                folded.begin_as(tenant)
                async with conn.transaction():
                    assert tuple(await conn.fetchrow(read)) == (strings, tenant)
    finally:
        await pool.close()


async def test_many_tenants_with_nothing_due_leave_a_backlog_a_share_and_say_there_is_more(
    eventbus_dsn: str, eventbus_schema: str
) -> None:
    """100 tenants with one event each, not yet due, and tenant a's backlog: the claim still takes at least 50 of
    a's rows, and says a tenant offered its full share (the relay then claims again at once)."""
    s = quote_schema(eventbus_schema)
    conn = await asyncpg.connect(eventbus_dsn)
    try:
        await conn.executemany(f"INSERT INTO {s}.eventbus_outbox (id, event_id, tenant, topic, payload, available_at) "
                               "VALUES ($1, $1, $2, 'Billed', '{\"n\": 0}', now() + interval '1 hour')",
                               [(new_id(), f"t{i}") for i in range(100)])  # fmt: skip
        await conn.executemany(f"INSERT INTO {s}.eventbus_outbox (id, event_id, tenant, topic, payload) "
                               "VALUES ($1, $1, 'a', 'Billed', '{\"n\": 0}')", [(new_id(),) for _ in range(2000)])
        rows = await conn.fetch(Queries(eventbus_schema).claim, 500, "relay-1", 30.0, None, None, None, None, None)
        assert len(rows) == 50 and {r["tenant"] for r in rows} == {"a"}
        assert rows[0]["more"] is True
    finally:
        await conn.close()
