"""Property tests of the delivery guarantees (docs/architecture.md) over random histories, against a real PostgreSQL.

A history is a list of steps: commit or roll back a few events (each with random keys, for one of two tenants in
turn, and a per-subscriber fault plan: raise, hang past the timeout, or meet a cancelled future on given
attempts; one subscriber is a plain ``def`` handler whose hung threads are abandoned), start or gracefully stop
an extra relay (up to three EventBus instances on the same schema; an "old" one, as in a rolling deploy, lacks
the ordered subscriber, which the relays started first carry), crash a relay (its task group is cancelled with
no graceful hand-back and its pool terminated, so its claimed rows stay leased until the short lease runs out),
kill a relay's database connections (pg_terminate_backend of its pool and LISTEN session, as a
network failure would), and pauses. Relays have room for two batches of four rows and detach laggards after
0.2 s, so backlogs outgrow what a relay holds, several batches are in flight, ordered keys retry while others go
on, and shares travel on in continuation rows. After the old relays stopped (the rollout is over), a relay with
every subscriber drains the outbox, and the invariants are checked:

1. every committed event reached every subscriber, or has that subscriber's dead letter with the reason of its
   last attempt (HandlerTimeout when it hung, DeliveryFailed when it raised); this includes the events an old
   relay handled (rollout catch-up);
2. nothing from a rolled-back transaction was delivered (or even stored);
3. the transactional subscriber has exactly one effect row per handled event (none for a dead-lettered one);
4. the ordered subscriber's first successful handlings of each (tenant, key) are in publish (event id) order,
   each with its event's tenant, and it never handled two events of one (tenant, key) at the same time, across
   relays.

The same runs over the partitioned outbox layout (fewer examples).

Without crashes the check is exact: each subscriber saw attempts 1, 2, ... once each, stopped at its first
success, and was dead-lettered after exactly max_attempts failures.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import asyncpg
import msgspec
import pytest
from anyio.abc import TaskGroup, TaskStatus
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from eventbus import Backoff, Context, EventBus, LocalTransport, NewEvent, Reason, RelayConfig, migrate
from eventbus.migrations import Partitioning
from eventbus.sql import quote_schema

pytestmark = pytest.mark.slow  # about a minute with the default 30 examples

EXAMPLES = int(os.environ.get("EVENTBUS_RELAY_EXAMPLES", "30"))
CONFIG = RelayConfig(
    poll_interval=0.05, lease=2, reclaim_interval=0.2, heartbeat_interval=0.2, batch_size=4, max_batches_in_flight=2
)
QUICK = Backoff(initial=0.01, jitter=0)
MAX_ATTEMPTS = 3
TIMEOUT = 0.4  # the healthy handlers do next to nothing; a hang sleeps far past this
MAX_RELAYS = 3
DRAIN = 120.0
SUBSCRIBERS = ("plain", "tx", "ordered", "threaded")
#: How long a plain ``def`` handler planned to time out blocks its thread (past TIMEOUT: the thread is abandoned).
THREAD_HANG = 0.6
KEYS = ("a", "b", "c", None)

Fault = Literal["raise", "timeout", "cancel"]
#: What a transactional attempt fails with when its connection is killed under it.
DRIVER_ERRORS = {"InterfaceError", "ConnectionDoesNotExistError", "InternalClientError", "ConnectionResetError"}
Plan = dict[str, dict[int, Fault]]  # subscriber -> attempt -> fault
History = tuple[int, list[tuple[Any, ...]]]


class Item(msgspec.Struct, frozen=True):
    n: int
    key: str | None


def tenant_of(n: int) -> str:
    """Events take turns between two tenants (the default one and "t2"), so every history mixes tenants: each
    key then runs in both, and its order holds per tenant (claims and queues take tenants in turn)."""
    return "t2" if n % 2 else ""


class Boom(Exception):
    pass


# -- histories ----------------------------------------------------------------------------------------------

#: raise: an exception; timeout: hang past the handler's timeout; cancel: await a future that other code cancels
#: (a CancelledError that is no stop of the bus's: a failed attempt like any other)
fault = st.sampled_from(["raise", "timeout", "cancel"])
faults = st.one_of(
    st.dictionaries(st.integers(1, MAX_ATTEMPTS), fault, max_size=MAX_ATTEMPTS),
    # every attempt fails: a dead letter, whose reason is that of the last attempt
    st.lists(fault, min_size=MAX_ATTEMPTS, max_size=MAX_ATTEMPTS).map(lambda fs: dict(enumerate(fs, 1))),
)
plans = st.one_of(st.just({}), st.dictionaries(st.sampled_from(SUBSCRIBERS), faults, max_size=2))
events = st.tuples(st.sampled_from(KEYS), plans)
commit = st.tuples(st.just("commit"), st.lists(events, min_size=1, max_size=6))
#: crash after a delay, or once the relay holds rows plus a delay (mid-batch: some handlers done, some not)
crash_step = st.tuples(
    st.just("crash"), st.integers(0, MAX_RELAYS - 1), st.booleans(), st.sampled_from([0.0, 0.02, 0.06, 0.2])
)
steps = st.one_of(
    commit,
    commit,  # listed twice (as is crash): one_of picks its branches about equally often
    st.tuples(st.just("rollback"), st.lists(st.sampled_from(KEYS), min_size=1, max_size=4)),
    st.tuples(st.just("start"), st.booleans()),  # True: an old relay, without the ordered subscriber
    # True: a stop whose timeout (0.1 s) is shorter than the handlers still running (they are cancelled)
    st.tuples(st.just("stop"), st.integers(0, MAX_RELAYS - 1), st.booleans()),
    # A row no relay can handle: of a topic nobody knows (targeted at plain), or with unreadable headers
    st.tuples(st.just("poison"), st.sampled_from(["topic", "headers"])),
    crash_step,
    crash_step,
    st.tuples(st.just("pause"), st.sampled_from([0.0, 0.05, 0.3])),
    st.tuples(st.just("kill"), st.integers(0, MAX_RELAYS - 1)),
)
#: (relays running at first, steps)
histories = st.tuples(st.integers(1, MAX_RELAYS), st.lists(steps, min_size=2, max_size=12))


# -- what the handlers saw ----------------------------------------------------------------------------------


@dataclass
class World:
    plans: dict[int, Plan] = field(default_factory=dict)
    keys: dict[int, str | None] = field(default_factory=dict)
    committed: dict[int, uuid.UUID] = field(default_factory=dict)  # n -> event_id
    rolled_back: set[int] = field(default_factory=set)
    #: (subscriber, n) -> one [attempt, outcome] per run, outcome "ok", "raise" or "hang" (never finished)
    runs: defaultdict[tuple[str, int], list[list[Any]]] = field(default_factory=lambda: defaultdict(list))
    #: ((tenant, key), n) of the ordered subscriber's first successful handlings, in handling order
    ordered_first: list[tuple[tuple[str, str | None], int]] = field(default_factory=list)
    ordered_done: set[int] = field(default_factory=set)
    ordered_running: dict[tuple[str, str], int] = field(default_factory=dict)  # (tenant, key) -> event handled now
    overlaps: list[tuple[tuple[str, str], int, int]] = field(default_factory=list)
    crashed: int = 0
    most_relays: int = 0
    old_relays: int = 0
    #: Rows no relay can handle (their event id: the row id) -> the dead letter's reason and subscriber.
    poison: dict[uuid.UUID, tuple[Reason, str | None]] = field(default_factory=dict)
    next_n: int = 0
    effects_table: str = ""

    def new_n(self) -> int:
        self.next_n += 1
        return self.next_n


async def behave(world: World, sub: str, event: Item, ctx: Context) -> None:
    if sub == "ordered" and event.key is not None:
        # Order is per tenant and key: the same key of two tenants is two keys.
        ordered_key = (ctx.tenant, event.key)
        other = world.ordered_running.get(ordered_key)
        if other is not None:
            world.overlaps.append((ordered_key, other, event.n))
        world.ordered_running[ordered_key] = event.n
        try:
            await _behave(world, sub, event, ctx)
        finally:
            if world.ordered_running.get(ordered_key) == event.n:
                del world.ordered_running[ordered_key]
    else:
        try:
            await _behave(world, sub, event, ctx)
        except Exception as exc:
            if not isinstance(exc, Boom):
                _errored(world, sub, event, ctx)
            raise


async def _behave(world: World, sub: str, event: Item, ctx: Context) -> None:
    run: list[Any] = [ctx.attempt, "hang"]
    world.runs[(sub, event.n)].append(run)
    if sub == "plain":
        # Dawdle a little, so a batch is often settled well after the transactional subscriber committed:
        # a crash in between must not double its effect.
        await anyio.sleep(0.05)
    if sub == "tx":
        await ctx.connection.execute(
            f"INSERT INTO {world.effects_table} (event_id, n) VALUES ($1, $2)", ctx.event_id, event.n
        )
    fault = world.plans.get(event.n, {}).get(sub, {}).get(ctx.attempt)
    if fault == "raise":
        run[1] = "raise"
        raise Boom(f"planned failure of {sub} on attempt {ctx.attempt}")
    if fault == "cancel":
        run[1] = "raise"
        cancelled = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(cancelled.cancel)
        await cancelled  # raises CancelledError, though nobody cancelled this task
    if fault == "timeout":
        await anyio.sleep(60)
    run[1] = "ok"


def behave_in_thread(world: World, event: Item, ctx: Context) -> None:
    run: list[Any] = [ctx.attempt, "hang"]
    world.runs[("threaded", event.n)].append(run)
    fault = world.plans.get(event.n, {}).get("threaded", {}).get(ctx.attempt)
    if fault in ("raise", "cancel"):  # a thread meets no cancelled future: it raises
        run[1] = "raise"
        raise Boom(f"planned failure of threaded on attempt {ctx.attempt}")
    if fault == "timeout":
        time.sleep(THREAD_HANG)  # abandoned after TIMEOUT; it ends later on its own, its outcome ignored
        return
    run[1] = "ok"


def _errored(world: World, sub: str, event: Item, ctx: Context) -> None:
    """An attempt failed by no plan of the test's (its connection was killed): the relaxed checks allow it."""
    runs = world.runs.get((sub, event.n))
    if runs and runs[-1][0] == ctx.attempt and runs[-1][1] == "hang":
        runs[-1][1] = "error"
    if sub == "ordered" and event.n not in world.ordered_done:
        world.ordered_done.add(event.n)
        world.ordered_first.append(((ctx.tenant, event.key), event.n))


def build_bus(dsn: str, schema: str, world: World, *, old: bool = False, **kwargs: Any) -> EventBus:
    bus = EventBus(
        dsn, schema=schema, relay_config=CONFIG, pool_size=5, stop_timeout=60, migrate=False,
        transport=LocalTransport(mailbox_size=4, detach_after=0.2), **kwargs,
    )  # fmt: skip
    common: dict[str, Any] = {"timeout": TIMEOUT, "max_attempts": MAX_ATTEMPTS, "backoff": QUICK}

    # A plain def handler, on the subscriber's daemon threads (2 x concurrency of them: more than the threads a
    # history can hang at once, so no attempt waits for a thread).
    @bus.subscribe(name="threaded", concurrency=8, **common)
    def threaded(event: Item, ctx: Context) -> None:
        behave_in_thread(world, event, ctx)

    @bus.subscribe(name="plain", concurrency=3, **common)
    async def plain(event: Item, ctx: Context) -> None:
        await behave(world, "plain", event, ctx)

    @bus.subscribe(name="tx", transactional=True, concurrency=2, **common)
    async def tx(event: Item, ctx: Context) -> None:
        await behave(world, "tx", event, ctx)

    if old:
        return bus  # a relay of the release before the ordered subscriber was added

    @bus.subscribe(name="ordered", ordered=True, concurrency=2, **common)
    async def ordered(event: Item, ctx: Context) -> None:
        await behave(world, "ordered", event, ctx)

    return bus


# -- relays that stop, or crash ------------------------------------------------------------------------------


class RelayHandle:
    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.name = ""
        self.old = False
        self.stop_timeout: float | None = None
        self.mode: Literal["stop", "crash"] = "stop"
        self.requested = anyio.Event()
        self.done = anyio.Event()

    async def end(self, mode: Literal["stop", "crash"]) -> None:
        self.mode = mode
        self.requested.set()
        await self.done.wait()


async def _abandon() -> None:
    """A killed process hands nothing back: its rows wait for their lease to run out."""


async def crash(bus: EventBus) -> None:
    """Cancel the bus's relay and subscribers abruptly, as kill -9 would, and drop its connections."""
    relay = bus.relay
    assert relay is not None
    relay._release_unsettled = _abandon  # type: ignore[method-assign]
    serving = bus._serving
    assert serving is not None
    bus._serving = None
    serving.cancel()
    await asyncio.wait((serving,))
    pool, bus._pool = bus._pool, None
    assert pool is not None
    # Its transactions roll back on the server as they would when the process dies. (Closing, then
    # terminating, lets asyncpg finish the releases it started, instead of failing them noisily.)
    with anyio.move_on_after(2):
        await pool.close()
    pool.terminate()


async def run_relay(handle: RelayHandle, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Own one bus in this task (its task group must be entered and left in one task)."""
    await handle.bus.start()
    try:
        task_status.started()
        await handle.requested.wait()
    finally:
        # No shield here: the bus's task group must be left from the scope it was entered in. When the test
        # itself is cancelled (a failure elsewhere), the relay is torn down like a crash.
        if handle.mode == "crash" or not handle.requested.is_set():
            await crash(handle.bus)
        else:
            await handle.bus.stop(handle.stop_timeout)
        handle.done.set()


# -- one history ---------------------------------------------------------------------------------------------


class Rollback(Exception):
    pass


@dataclass
class Outcome:
    letters: list[asyncpg.Record]
    effects: dict[int, int]
    stored_ns: set[int]
    unsettled: int
    #: The tables the outbox's rows lie in (the partitioned layout: its partitions).
    tables: set[str] = field(default_factory=set)
    partitioned: bool = False


async def run_history(
    dsn: str, history: History, partitioning: Partitioning | None = None
) -> tuple[World, Outcome]:
    schema = f"p_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, schema, partitioning=partitioning)
        world = World(effects_table=f"{quote_schema(schema)}.effects")
        await conn.execute(f"CREATE TABLE {world.effects_table} (event_id uuid NOT NULL, n int NOT NULL)")
        publisher = EventBus(dsn, schema=schema, relay=False, migrate=False, pool_size=2)
        await publisher.connect()
        try:
            async with anyio.create_task_group() as tg:
                await _play(dsn, schema, world, publisher, tg, history)
            outcome = await _collect(conn, schema)
        finally:
            await publisher.close()
        return world, outcome
    finally:
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {quote_schema(schema)} CASCADE")
        finally:
            await conn.close()


async def _play(dsn: str, schema: str, world: World, publisher: EventBus, tg: TaskGroup, history: History) -> None:
    relays, steps = history
    live: list[RelayHandle] = []

    async def start_relay(old: bool = False) -> None:
        # Each relay's connections carry a name of their own, so that a step can kill one relay's connections.
        name = f"relay-{uuid.uuid4().hex[:8]}"
        separator = "&" if "?" in dsn else "?"
        handle = RelayHandle(build_bus(f"{dsn}{separator}application_name={name}", schema, world, old=old))
        handle.name, handle.old = name, old
        await tg.start(run_relay, handle)
        live.append(handle)
        world.most_relays = max(world.most_relays, len(live))

    try:
        for _ in range(relays):
            await start_relay()
        for step in steps:
            kind = step[0]
            if kind == "commit":
                async with publisher.transaction() as tx:
                    for key, plan in step[1]:
                        n = world.new_n()
                        world.plans[n], world.keys[n] = plan, key
                        event_id = await tx.publish(Item(n, key), key=key, tenant=tenant_of(n))
                        assert event_id is not None
                        world.committed[n] = event_id
            elif kind == "rollback":
                doomed: list[int] = []
                try:
                    async with publisher.transaction() as tx:
                        for key in step[1]:
                            n = world.new_n()
                            doomed.append(n)
                            await tx.publish(Item(n, key), key=key, tenant=tenant_of(n))
                        raise Rollback
                except Rollback:
                    world.rolled_back.update(doomed)
            elif kind == "start":
                if len(live) < MAX_RELAYS:
                    old = len(step) > 1 and step[1]
                    await start_relay(old)
                    world.old_relays += old
            elif kind == "stop":
                if live:
                    handle = live.pop(step[1] % len(live))
                    if len(step) > 2 and step[2]:
                        handle.stop_timeout = 0.1
                        world.crashed += 1  # handlers cut short: attempts may repeat, the relaxed checks apply
                    await handle.end("stop")
            elif kind == "poison":
                async with publisher.transaction() as tx:
                    if step[1] == "topic":
                        (row_id,) = (await tx.offer([NewEvent(topic="renamed.away", payload=b'{"n": -1, "key": null}',
                                                              target="plain")])).ids  # fmt: skip
                        world.poison[row_id] = (Reason.HANDLER_MISSING, "plain")
                    else:
                        row_id = await tx.publish(Item(-1, None))
                        await tx.connection.execute(
                            f"UPDATE {quote_schema(schema)}.eventbus_outbox SET headers = '{{\"x\": 1}}' WHERE id = $1",
                            row_id,
                        )
                        world.poison[row_id] = (Reason.DESERIALIZATION_FAILED, None)
            elif kind == "crash":
                if live:
                    handle = live.pop(step[1] % len(live))
                    when_busy, delay = step[2], step[3]
                    if when_busy:
                        relay = handle.bus.relay
                        assert relay is not None
                        with anyio.move_on_after(1.0):
                            while relay.statistics().unsettled == 0:  # noqa: ASYNC110 - polling a counter
                                await anyio.sleep(0.005)
                    await anyio.sleep(delay)
                    await handle.end("crash")
                    world.crashed += 1
            elif kind == "pause":
                await anyio.sleep(step[1])
            elif kind == "kill" and live:
                # As a network failure would: the relay's pool and session connections die under it.
                await publisher.pool.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                    live[step[1] % len(live)].name,
                )
                world.crashed += 1  # settles may fail and rows come back: the relaxed checks apply
        # The rollout ends: the old relays stop, and a relay with every subscriber delivers what waits for it.
        for handle in [handle for handle in live if handle.old]:
            live.remove(handle)
            await handle.end("stop")
        if not live:
            await start_relay()
        await live[0].bus.drain(DRAIN)
    finally:
        while live:
            await live.pop().end("stop")


async def _collect(conn: asyncpg.Connection, schema: str) -> Outcome:
    s = quote_schema(schema)
    letters = await conn.fetch(
        f"SELECT event_id, subscriber, reason, attempts, error_type, error, (payload->>'n')::int AS n "
        f"FROM {s}.eventbus_dead_letters"
    )
    effects = {r["n"]: r["count"] for r in await conn.fetch(f"SELECT n, count(*) FROM {s}.effects GROUP BY n")}
    stored = {r["n"] for r in await conn.fetch(f"SELECT (payload->>'n')::int AS n FROM {s}.eventbus_outbox")}
    unsettled = await conn.fetchval(f"SELECT count(*) FROM {s}.eventbus_outbox WHERE status IN (0, 1)")
    tables = {r["t"].split(".")[-1] for r in await conn.fetch(
        f"SELECT DISTINCT tableoid::regclass::text AS t FROM {s}.eventbus_outbox")}  # fmt: skip
    partitioned = await conn.fetchval("SELECT relkind = 'p' FROM pg_class WHERE oid = $1::regclass",
                                      f"{s}.eventbus_outbox")  # fmt: skip
    return Outcome(list(letters), effects, stored, unsettled, tables, partitioned)


# -- the invariants ------------------------------------------------------------------------------------------


def check_invariants(world: World, out: Outcome) -> None:
    assert out.unsettled == 0

    # 2. Nothing from a rolled-back transaction was stored or delivered.
    assert not (world.rolled_back & out.stored_ns)
    assert not any(n in world.rolled_back for _, n in world.runs)
    assert set(world.committed) <= out.stored_ns

    # Poison rows: one dead letter each, of the right reason, and no handler ran them.
    poisoned = [letter for letter in out.letters if letter["event_id"] in world.poison]
    assert sorted(letter["event_id"] for letter in poisoned) == sorted(world.poison), poisoned
    for letter in poisoned:
        assert (letter["reason"], letter["subscriber"]) == world.poison[letter["event_id"]], letter
    assert not any(n == -1 for _, n in world.runs), "a handler ran a poison row"

    letters: dict[tuple[int, str], asyncpg.Record] = {}
    for letter in out.letters:
        if letter["event_id"] in world.poison:
            continue
        n, sub = letter["n"], letter["subscriber"]
        assert n in world.committed and letter["event_id"] == world.committed[n], letter
        assert sub in SUBSCRIBERS, letter
        assert (n, sub) not in letters, f"two dead letters for event {n} and {sub}"
        assert letter["reason"] in (Reason.DELIVERY_FAILED, Reason.HANDLER_TIMEOUT), letter
        letters[(n, sub)] = letter

    for n in world.committed:
        for sub in SUBSCRIBERS:
            runs = world.runs.get((sub, n), [])
            plan = world.plans[n].get(sub, {})
            letter = letters.get((n, sub))
            where = f"event {n} (key {world.keys[n]!r}, plan {world.plans[n]}), {sub}: runs {runs}, letter {letter}"
            if world.crashed:
                check_with_crashes(sub, runs, plan, letter, out.effects.get(n, 0), where)
            else:
                check_exactly(sub, runs, plan, letter, out.effects.get(n, 0), where)

    # 4. Per tenant and key, first successful handlings by the ordered subscriber are in commit (= publish) order.
    by_key: defaultdict[tuple[str, str], list[int]] = defaultdict(list)
    for (tenant, key), n in world.ordered_first:
        assert tenant == tenant_of(n), f"event {n} handled as tenant {tenant!r}"
        if key is not None:
            by_key[tenant, key].append(n)
    for key, ns in by_key.items():
        assert ns == sorted(ns), f"key {key!r} handled out of publish order: {ns}"
    assert not world.overlaps, f"two events of one key handled at once: {world.overlaps}"


def _reason_of_last(runs: list[list[Any]]) -> Reason:
    return Reason.HANDLER_TIMEOUT if runs[-1][1] == "hang" else Reason.DELIVERY_FAILED


def check_exactly(
    sub: str, runs: list[list[Any]], plan: dict[int, Fault], letter: asyncpg.Record | None, effects: int, where: str
) -> None:
    """No crash: attempts 1..k ran once each, up to the first success or max_attempts failures."""
    assert [a for a, _ in runs] == list(range(1, len(runs) + 1)), where
    for attempt, outcome in runs:
        planned = plan.get(attempt)
        # A healthy attempt may time out on a badly stalled machine ("hang"); a planned fault never succeeds.
        allowed = {"raise": {"raise"}, "cancel": {"raise"}, "timeout": {"hang"}, None: {"ok", "hang"}}[planned]
        assert outcome in allowed, where
    outcomes = [o for _, o in runs]
    if "ok" in outcomes:
        assert outcomes.index("ok") == len(outcomes) - 1, where  # nothing ran after the success
        assert letter is None, where
        if sub == "tx":
            assert effects == 1, where
    else:
        # 1 and 5: every failure is dead-lettered after max_attempts, with the reason of the last attempt.
        assert len(runs) == MAX_ATTEMPTS, where
        assert letter is not None, where
        assert letter["attempts"] == MAX_ATTEMPTS, where
        assert letter["reason"] == _reason_of_last(runs), where
        if sub == "tx":
            assert effects == 0, where
    if sub != "tx":
        assert effects in (0, 1)


def check_with_crashes(
    sub: str, runs: list[list[Any]], plan: dict[int, Fault], letter: asyncpg.Record | None, effects: int, where: str
) -> None:
    """With crashes, attempts can repeat or be cut short; the outcome must still be delivered or dead-lettered."""
    outcomes = [o for _, o in runs]
    for attempt, outcome in runs:
        if plan.get(attempt) == "timeout":
            assert outcome == "hang", where
        if outcome == "raise":
            assert plan.get(attempt) in ("raise", "cancel"), where
        if outcome == "error":
            assert sub == "tx", where  # only the transactional subscriber's attempts use a connection
    # 1. At least once, or a dead letter.
    assert "ok" in outcomes or letter is not None, where
    if sub == "tx":
        # 3. Exactly one effect per handled event, through crashes and redeliveries.
        assert effects <= 1, where
        if letter is None:
            assert effects == 1, where
        elif effects == 1:
            # Handled and committed, then its relay died before settling, so it came back too many times.
            assert letter["error_type"] == "AttemptsExhausted", where
    if letter is not None:
        if letter["error_type"] == "AttemptsExhausted":
            assert letter["reason"] == Reason.DELIVERY_FAILED, where
            assert letter["attempts"] > MAX_ATTEMPTS, where
        else:
            # 5. The reason is that of the last attempt (its run may also have been cut short by a crash).
            assert letter["attempts"] == MAX_ATTEMPTS, where
            last = [o for a, o in runs if a == MAX_ATTEMPTS]
            wanted = {"hang"} if letter["reason"] == Reason.HANDLER_TIMEOUT else {"raise", "error"}
            # A killed connection can end the transactional subscriber's last attempt in its transaction's
            # rollback, after the handler itself raised or timed out: then the driver's error is the reason.
            killed = sub == "tx" and letter["error_type"] in DRIVER_ERRORS
            assert killed or wanted & set(last), where


# -- the test -------------------------------------------------------------------------------------------------


HEALTHY = [("a", {}), ("b", {}), ("c", {}), (None, {}), ("a", {})]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # The explain phase re-runs a failure many times; with relays and leases it costs minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
@given(history=histories)
# Histories worth running every time: a relay killed after the transactional subscriber committed but before
# the batch was settled (its rows come back after the lease); an ordered subscriber failing and retrying while
# later events of its key wait, with the partitions handed over between relays; every attempt failing.
@example(history=(1, [("commit", HEALTHY), ("crash", 0, True, 0.02), ("start",)]))
# Handlers that meet a cancelled future, poison rows, a stop that cuts a hung handler short, and a plain def
# handler that hangs on every attempt (its threads are abandoned).
@example(history=(1, [
    ("commit", [("a", {"ordered": {1: "cancel"}, "plain": {1: "cancel", 2: "cancel", 3: "cancel"}}), ("a", {})]),
    ("poison", "topic"), ("poison", "headers"), ("start", False),
    ("commit", [("b", {"tx": {1: "timeout"}}), (None, {"plain": {1: "timeout"}})]), ("stop", 0, True),
    ("commit", [("c", {"threaded": {1: "timeout", 2: "timeout", 3: "timeout"}}), (None, {"threaded": {1: "raise"}})]),
    ("commit", HEALTHY),
]))  # fmt: skip
# A rolling deploy: an old relay without the ordered subscriber takes over every partition and handles events
# the ordered subscriber must still get, in order, once the old relay is gone.
@example(history=(1, [
    ("start", True), ("stop", 0), ("commit", HEALTHY), ("commit", [("a", {"ordered": {1: "raise"}}), ("a", {})]),
    ("pause", 0.3), ("start", False), ("commit", HEALTHY),
]))  # fmt: skip
@example(history=(2, [("commit", HEALTHY), ("crash", 1, True, 0.03), ("commit", HEALTHY), ("crash", 0, True, 0.0)]))
@example(history=(2, [
    ("commit", [
        ("a", {"ordered": {1: "raise"}}), ("a", {}), ("b", {"ordered": {1: "timeout", 2: "raise"}}), ("b", {}),
    ]),
    ("stop", 0),
    ("commit", [("a", {}), ("b", {"ordered": {1: "raise"}}), ("a", {})]),
    ("start",),
    ("commit", [("b", {}), ("a", {})]),
]))  # fmt: skip
@example(history=(1, [
    ("commit", [
        ("a", {"plain": {1: "raise", 2: "raise", 3: "timeout"}, "tx": {1: "timeout", 2: "timeout", 3: "raise"}}),
        ("a", {"ordered": {1: "timeout", 2: "raise", 3: "timeout"}, "tx": {1: "raise", 2: "raise", 3: "raise"}}),
    ]),
    ("rollback", ["a", "b", None]),
]))  # fmt: skip
def test_delivery_invariants_hold_over_random_histories(eventbus_dsn: str, history: History) -> None:
    world, outcome = anyio.run(run_history, eventbus_dsn, history, backend="asyncio")
    event("crashed" if world.crashed else "no crash (exact check)")
    event(f"relays at once: {world.most_relays}")
    event("an old relay ran (rollout)" if world.old_relays else "no old relay")
    event("with dead letters" if outcome.letters else "no dead letters")
    redelivered = any(any(o == "ok" for _, o in runs[:-1]) for runs in world.runs.values())
    event("a handled event came back after a crash" if redelivered else "no redelivery after success")
    check_invariants(world, outcome)


@settings(
    max_examples=max(3, EXAMPLES // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
@given(history=histories)
@example(history=(1, [("commit", HEALTHY), ("crash", 0, True, 0.02), ("start",)]))
@example(history=(2, [
    ("commit", [("a", {"ordered": {1: "raise"}}), ("a", {}), ("b", {"ordered": {1: "timeout"}}), ("b", {})]),
    ("stop", 0), ("poison", "headers"), ("commit", [("a", {}), ("b", {}), (None, {"tx": {1: "raise"}})]), ("start",),
]))  # fmt: skip
def test_delivery_invariants_hold_on_the_partitioned_outbox(eventbus_dsn: str, history: History) -> None:
    """The same invariants with the outbox partitioned: settles move rows out of the live partition, keys are
    taken through its trigger, and claims read it alone."""
    world, outcome = anyio.run(run_history, eventbus_dsn, history, "hourly", backend="asyncio")
    check_invariants(world, outcome)
    assert outcome.partitioned
    assert outcome.tables <= {"eventbus_outbox_history", *(t for t in outcome.tables if t.startswith(
        "eventbus_outbox_settled_2"))}, f"every row settled out of the live partition: {outcome.tables}"  # fmt: skip


def test_the_checker_catches_broken_histories() -> None:
    """The invariant checks can fail: feed them outcomes that break each invariant."""
    event_id = uuid.uuid4()

    def world_with(runs: dict[str, list[list[Any]]], crashed: int = 0) -> World:
        world = World(crashed=crashed)
        world.plans[1], world.keys[1], world.committed[1] = {}, "a", event_id
        for sub, sub_runs in runs.items():
            world.runs[(sub, 1)] = sub_runs
        return world

    healthy = {sub: [[1, "ok"]] for sub in SUBSCRIBERS}
    good = Outcome(letters=[], effects={1: 1}, stored_ns={1}, unsettled=0)
    check_invariants(world_with(healthy), good)
    check_invariants(world_with(healthy, crashed=1), good)

    broken: list[tuple[World, Outcome]] = [
        (world_with({**healthy, "plain": []}), good),  # never delivered, no dead letter
        (world_with(healthy), Outcome([], {1: 2}, {1}, 0)),  # two effects
        (world_with(healthy, crashed=1), Outcome([], {1: 2}, {1}, 0)),
        (world_with({**healthy, "tx": [[1, "ok"], [2, "ok"]]}), good),  # ran again after success
        (world_with(healthy), Outcome([], {1: 1}, {1}, 1)),  # left pending
    ]
    rolled = world_with(healthy)
    rolled.rolled_back.add(1)
    broken.append((rolled, good))
    out_of_order = world_with(healthy)
    out_of_order.ordered_first = [(("", "a"), 4), (("", "a"), 2)]
    broken.append((out_of_order, good))
    overlapping = world_with(healthy)
    overlapping.overlaps = [(("", "a"), 1, 2)]
    broken.append((overlapping, good))
    wrong_tenant = world_with(healthy)
    wrong_tenant.ordered_first = [(("t2", "a"), 2)]  # event 2 is the default tenant's
    broken.append((wrong_tenant, good))
    for world, outcome in broken:
        with pytest.raises(AssertionError):
            check_invariants(world, outcome)
