"""Coalesced relay wake-ups: a started bus sends at most one per ``wake_spacing``, and every commit is followed
by one sent after it returned, also when a COMMIT fails, the waker's connection dies, or the bus stops.

The example tests use a spacing far longer than the test's steps, so which COMMIT carries the wake-up does not
depend on the machine's speed. The property test uses a relay as the judge: it polls once a minute, so every
event it delivers within the test's 10 s was found through a wake-up.
"""

from __future__ import annotations

import itertools
from time import monotonic

import anyio
import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from listening import Listener

from eventbus import ConfigurationError, Context, EventBus, RelayConfig
from eventbus._waker import Waker
from eventbus.sql import quote_schema

pytestmark = pytest.mark.anyio


class Pinged(msgspec.Struct, frozen=True):
    n: int


async def _commit(bus: EventBus, n: int) -> None:
    async with bus.transaction() as tx:
        await tx.publish(Pinged(n))


async def test_commits_within_the_spacing_share_one_wake_up_sent_after_the_last(
    eventbus_dsn: str, eventbus_schema: str, listener: Listener
) -> None:
    async with EventBus(eventbus_dsn, schema=eventbus_schema, wake_spacing=1.0) as bus:
        await _commit(bus, 0)  # carries the wake-up in its COMMIT message
        assert await listener.wait_for(1) == 1
        for n in range(1, 4):  # within the spacing: they carry none, and are owed one
            await _commit(bus, n)
        assert bus.outbox.waker.carried == 1
        assert bus.outbox.waker.sent == 0, "the waker must leave a COMMIT the spacing to carry it"
        assert await listener.wait_for(2) == 2  # the waker's, after two spacings
        stats = bus.statistics()
        assert (stats.wake_ups_carried, stats.wake_ups_sent) == (1, 1)


async def test_stop_sends_the_wake_up_it_owes(eventbus_dsn: str, eventbus_schema: str, listener: Listener) -> None:
    async with EventBus(eventbus_dsn, schema=eventbus_schema, wake_spacing=60.0) as bus:
        await _commit(bus, 0)
        await _commit(bus, 1)  # owed: the next is due in two minutes
        waker = bus.outbox.waker
    assert await listener.wait_for(2) == 2, "stopping must not keep the owed wake-up for a minute"
    assert (waker.carried, waker.sent) == (1, 1)


async def _fail_at_commit(bus: EventBus) -> None:
    """A bus transaction with a due event whose COMMIT fails (a deferred unique constraint)."""
    s = quote_schema(bus.schema)
    with pytest.raises(asyncpg.UniqueViolationError):
        async with bus.transaction() as tx:
            await tx.connection.execute(f"""
                CREATE TABLE IF NOT EXISTS {s}.once (k int, CONSTRAINT once_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED);
                INSERT INTO {s}.once VALUES (1), (1);
            """)  # fmt: skip
            await tx.publish(Pinged(-1))


async def test_a_commit_that_fails_carrying_the_wake_up_leaves_it_owed(
    eventbus_dsn: str, eventbus_schema: str, listener: Listener
) -> None:
    async with EventBus(eventbus_dsn, schema=eventbus_schema, wake_spacing=1.0) as bus:
        start = monotonic()
        await _commit(bus, 0)  # carried
        assert await listener.wait_for(1) == 1
        await _commit(bus, 1)  # owed; the waker would send it two spacings after the first
        await anyio.sleep(start + 1.3 - monotonic())
        await _fail_at_commit(bus)  # a spacing has passed: this COMMIT carries the wake-up, and fails
        assert bus.outbox.waker.carried == 2
        assert await listener.wait_for(2) == 2, "the failed COMMIT's wake-up was owed to the commit before it"
        assert bus.outbox.waker.sent == 1


async def test_a_lost_waker_connection_is_replaced(eventbus_dsn: str, eventbus_schema: str, listener: Listener) -> None:
    async with EventBus(eventbus_dsn, schema=eventbus_schema, wake_spacing=0.2) as bus:
        waker = bus.outbox.waker
        for expected in (2, 4):
            await _commit(bus, 0)  # carried: two spacings passed while the listener waited
            await _commit(bus, 1)  # owed: the waker sends it on its own connection
            assert await listener.wait_for(expected) == expected
            async with bus.pool.acquire() as conn:  # the server ends the waker's session
                killed = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = 'eventbus waker' AND datname = current_database()"
                )
            assert killed >= 1
        assert (waker.carried, waker.sent) == (2, 2)


async def test_a_send_racing_the_servers_termination_of_its_session_is_retried(
    eventbus_dsn: str, eventbus_schema: str, listener: Listener
) -> None:
    # A statement sent just as the server's termination notice arrives fails in asyncpg with an
    # InternalClientError, not a connection error; it must not end the waker (and with it the bus's task group).
    async with EventBus(eventbus_dsn, schema=eventbus_schema) as bus, anyio.create_task_group() as tg:
        waker = Waker(bus.outbox.channel, bus.outbox.queries.wake, spacing=0)
        await tg.start(waker.run, eventbus_dsn)
        for expected in range(1, 6):
            waker.owe_nowait()
            assert await listener.wait_for(expected) == expected
            async with bus.pool.acquire() as conn:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'eventbus waker' AND datname = current_database()"
                )
        waker.stop()
    assert waker.sent == 5


@pytest.mark.parametrize("spacing", [-0.001, float("nan")])
def test_a_spacing_that_is_no_duration_is_refused(spacing: float) -> None:
    with pytest.raises(ConfigurationError, match="wake_spacing must be 0 or more seconds"):
        EventBus("postgresql://unused", wake_spacing=spacing)


# -- property: every commit is followed by a wake-up a relay can act on -----------------------------------------

Step = tuple[str, int]  # ("commit", transactions at once), ("rollback" | "fail" | "kill", 0), ("pause", ms)
_numbers = itertools.count(step=1000)  # event numbers unique across the examples sharing a schema

steps = st.one_of(
    st.tuples(st.just("commit"), st.integers(1, 4)),
    st.tuples(st.sampled_from(["rollback", "fail", "kill"]), st.just(0)),
    st.tuples(st.just("pause"), st.sampled_from([0, 1, 3, 10, 30])),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spacing=st.sampled_from([0.0, 0.002, 0.01, 0.05]), history=st.lists(steps, min_size=1, max_size=12))
async def test_every_committed_event_wakes_a_relay_that_never_polls(
    eventbus_dsn: str, eventbus_schema: str, spacing: float, history: list[Step]
) -> None:
    delivered: set[int] = set()
    committed: set[int] = set()
    history_done = False
    all_delivered = anyio.Event()
    consumer = EventBus(
        eventbus_dsn, schema=eventbus_schema, relay_config=RelayConfig(poll_interval=60.0), wake_spacing=spacing
    )

    @consumer.subscribe
    async def seen(event: Pinged, ctx: Context) -> None:
        delivered.add(event.n)
        if history_done and committed <= delivered:
            all_delivered.set()

    async with consumer, EventBus(eventbus_dsn, schema=eventbus_schema, wake_spacing=spacing) as producer:
        n = next(_numbers)
        for kind, arg in history:
            if kind == "commit":
                first, n = n, n + arg
                async with anyio.create_task_group() as tg:
                    for i in range(first, n):
                        tg.start_soon(_commit, producer, i)
                committed.update(range(first, n))
            elif kind == "rollback":
                with pytest.raises(LookupError):
                    async with producer.transaction() as tx:
                        await tx.publish(Pinged(-1))
                        raise LookupError
            elif kind == "fail":
                await _fail_at_commit(producer)
            elif kind == "kill":
                async with producer.pool.acquire() as conn:
                    await conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'eventbus waker' AND datname = current_database()"
                    )
            else:
                await anyio.sleep(arg / 1000)
        history_done = True
        if committed <= delivered:
            all_delivered.set()
        with anyio.move_on_after(10):  # the relay polls once a minute: only wake-ups can deliver in time
            await all_delivered.wait()
        assert committed <= delivered, f"never woken for {sorted(committed - delivered)}"
        assert not {n for n in delivered if n < 0}, "a rolled-back or failed transaction was delivered"
