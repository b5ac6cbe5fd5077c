"""Property-based replay tests for your own handlers, on a real database.

``assert_replay_safe`` publishes random histories of your events (commits and rollbacks) through a bus you
build, injects faults — a handler that raises or times out on a given attempt, a delivery that arrives twice
(what a relay crash between your handler's commit and the outbox update looks like), a dead letter that is
replayed — and checks the delivery invariants plus your own post-condition. When it fails, hypothesis shrinks
the history and it is printed in plain words.

Call it from a plain (synchronous) test function; it runs its own event loop, in a thread of its own, for the
whole run.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import msgspec
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from .._typing import Connection
from ..bus import EventBus
from ..handlers import Backoff, Context, Subscription
from ..relay import RelayConfig

__all__ = [
    "Fault",
    "HistoryStep",
    "ReplayCheckFailed",
    "assert_replay_safe",
    "events_of",
    "fault_plans",
    "histories",
]

log = logging.getLogger("eventbus.testing")


def events_of(cls: type[msgspec.Struct], **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Events of ``cls`` built from its msgspec fields (``st.from_type`` per field unless overridden)."""
    fields = {f.name: overrides.get(f.name, st.from_type(f.type)) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


@dataclass(frozen=True)
class Fault:
    """What goes wrong for one event: its handlers raise or time out on some attempts, it is delivered twice,
    or its dead letters are replayed once everything settled."""

    raise_on: frozenset[int] = frozenset()
    timeout_on: frozenset[int] = frozenset()
    delivered_twice: bool = False
    replay_dead_letters: bool = False

    def words(self) -> str:
        parts = []
        if self.raise_on:
            parts.append(f"handlers raise on attempt {', '.join(map(str, sorted(self.raise_on)))}")
        if self.timeout_on:
            parts.append(f"handlers time out on attempt {', '.join(map(str, sorted(self.timeout_on)))}")
        if self.delivered_twice:
            parts.append("it is delivered twice (as after a relay crash)")
        if self.replay_dead_letters:
            parts.append("its dead letters are replayed")
        return "; ".join(parts) or "no faults"


@dataclass(frozen=True)
class HistoryStep:
    """One producer transaction publishing ``event`` under ``key``, committed or rolled back."""

    event: Any
    key: str | None
    commit: bool
    fault: Fault = field(default_factory=Fault)

    def words(self) -> str:
        fate = "commit" if self.commit else "roll back"
        key = f" with key {self.key!r}" if self.key is not None else ""
        return f"publish {self.event!r}{key}, {fate}; {self.fault.words()}"


def fault_plans(max_attempt: int = 3) -> st.SearchStrategy[Fault]:
    """Faults for one event, shrinking towards "nothing goes wrong"."""
    attempts = st.frozensets(st.integers(1, max_attempt), max_size=max_attempt)
    return st.builds(Fault, attempts, attempts, st.booleans(), st.booleans())


def histories(
    events: st.SearchStrategy[Any],
    *,
    keys: st.SearchStrategy[str | None] | None = None,
    faults: st.SearchStrategy[Fault] | None = None,
    max_size: int = 6,
) -> st.SearchStrategy[list[HistoryStep]]:
    """Lists of producer transactions (mostly committed) with a fault plan each."""
    step = st.builds(
        HistoryStep,
        events,
        keys if keys is not None else st.sampled_from([None, "k1", "k2"]),
        st.sampled_from([True, True, True, False]),
        faults if faults is not None else fault_plans(),
    )
    return st.lists(step, min_size=1, max_size=max_size)


class ReplayCheckFailed(AssertionError):
    """An invariant or the user's post-condition failed for a history (printed in plain words)."""


class InjectedFault(Exception):
    """Raised by the harness inside a handler, as the fault plan says."""


@dataclass
class _Run:
    plans: dict[uuid.UUID, Fault] = field(default_factory=dict)
    completed: dict[tuple[str, uuid.UUID], int] = field(default_factory=dict)
    seen: set[uuid.UUID] = field(default_factory=set)


def _faulty(sub: Subscription, session: _Session) -> Subscription:
    """``sub`` with the current example's faults (``session.run``) put into its attempts, and the run's timeout
    (``session.timeout``)."""
    original = sub.handler

    async def handler(event: Any, ctx: Context) -> None:
        run = session.run
        run.seen.add(ctx.event_id)
        plan = run.plans.get(ctx.event_id, Fault())
        if ctx.attempt in plan.timeout_on:
            # What the runtime raises when an attempt passes its deadline, raised at once: the attempt is handled
            # as a timeout (retried, or dead-lettered as HandlerTimeout) without the example waiting for it.
            await anyio.lowlevel.checkpoint()
            raise TimeoutError
        if ctx.attempt in plan.raise_on:
            raise InjectedFault(f"planned failure on attempt {ctx.attempt}")
        args = (event, ctx) if sub.takes_context else (event,)
        if sub.is_async:
            await original(*args)
        else:
            await anyio.to_thread.run_sync(original, *args)
        slot = (sub.name, ctx.event_id)
        run.completed[slot] = run.completed.get(slot, 0) + 1

    return dataclasses.replace(
        sub, handler=handler, is_async=True, takes_context=True, timeout=session.timeout,
        backoff=Backoff(initial=0.0, factor=1.0, jitter=0.0),
    )  # fmt: skip


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclass
class _Session:
    """What one run keeps from example to example, on the event loop it has for the whole run: one schema,
    migrated once, and one started bus built by ``bus_factory``. Before each example, what ``setup`` made is
    dropped and eventbus's rows emptied (the relay's registration and partitions stay its own), which costs a
    fraction of a new migrated schema and a new bus. An example that ends with anything but a clean pass or a
    failed check stops the bus and gets a new schema for the next one; so does one whose ``setup`` fails on a
    reused schema (it makes something the reset does not drop, a type or a function)."""

    dsn: str
    bus_factory: Callable[[str, str], EventBus | Awaitable[EventBus]]
    setup: Callable[[Connection], Awaitable[None]] | None
    timeout: float
    name: str = field(default_factory=lambda: f"replay_{uuid.uuid4().hex[:12]}")
    migrated: bool = False
    reuse: bool = True
    bus: EventBus | None = None
    admin: Connection | None = None
    run: _Run = field(default_factory=_Run)

    @property
    def scoped_dsn(self) -> str:
        separator = "&" if "?" in self.dsn else "?"
        return f"{self.dsn}{separator}search_path={self.name},public"

    async def prepare(self) -> tuple[Connection, EventBus]:
        """The schema as a fresh one, the admin connection and the started bus, for the next example."""
        import asyncpg

        from ..migrations import migrate
        from ..sql import Queries, quote_schema

        # A connection of its own per example: what setup or check left in their session (a temporary table, a
        # setting, a role) goes with it.
        await self._close_admin()
        admin = self.admin = await asyncpg.connect(self.scoped_dsn)
        if self.migrated and self.reuse:
            queries = Queries(self.name)
            for row in await admin.fetch(queries.replay_leftovers):
                await admin.execute(row["statement"])
            await admin.execute(queries.replay_reset)
            try:
                if self.setup is not None:
                    await self.setup(admin)
                return admin, await self._started()
            except asyncpg.PostgresError:
                pass  # a new schema, below
        await self.close_bus()
        if self.migrated:
            await admin.execute(f"DROP SCHEMA IF EXISTS {quote_schema(self.name)} CASCADE")
        await migrate(admin, self.name)
        self.migrated = self.reuse = True
        if self.setup is not None:
            await self.setup(admin)
        return admin, await self._started()

    async def _started(self) -> EventBus:
        if self.bus is not None:
            return self.bus
        bus: EventBus = await _maybe(self.bus_factory(self.scoped_dsn, self.name))
        if bus.schema != self.name:
            raise ReplayCheckFailed(f"bus_factory must build EventBus(dsn, schema=schema); it used {bus.schema!r}")
        bus.subscriptions = {name: _faulty(sub, self) for name, sub in bus.subscriptions.items()}
        bus.relay_config = RelayConfig(poll_interval=0.005, lease=max(2.0, self.timeout * 5), reclaim_interval=0.2)
        await bus.start()
        self.bus = bus
        return bus

    async def close_bus(self) -> None:
        bus, self.bus = self.bus, None
        if bus is not None:
            with anyio.CancelScope(shield=True):
                await bus.stop()

    async def _close_admin(self) -> None:
        admin, self.admin = self.admin, None
        if admin is not None:
            try:
                await admin.close(timeout=5)
            except Exception:
                admin.terminate()

    async def discard(self) -> None:
        """After an example that did not end cleanly: a new bus and a new schema for the next one. What goes
        wrong stopping the bus is logged, not raised: the example's own error is the one to report."""
        self.reuse = False
        try:
            await self.close_bus()
        except Exception:
            log.warning("could not stop the bus of a failed replay example", exc_info=True)
        await self._close_admin()

    async def close(self) -> None:
        """Stop the bus and drop the schema (on a connection of its own), at the end of the run."""
        import asyncpg

        from ..sql import quote_schema

        try:
            await self.close_bus()
        finally:
            await self._close_admin()
            if self.migrated:
                conn = await asyncpg.connect(self.dsn)
                try:
                    await conn.execute(f"DROP SCHEMA IF EXISTS {quote_schema(self.name)} CASCADE")
                finally:
                    await conn.close()


async def _one_history(
    history: Sequence[HistoryStep],
    session: _Session,
    check: Callable[[Connection, list[Any]], Awaitable[None]] | None,
) -> None:
    try:
        await _play(history, session, check)
    except ReplayCheckFailed:
        raise
    except BaseException:
        await session.discard()
        raise


async def _play(
    history: Sequence[HistoryStep],
    session: _Session,
    check: Callable[[Connection, list[Any]], Awaitable[None]] | None,
) -> None:
    admin, bus = await session.prepare()
    run = session.run = _Run()
    committed: list[tuple[uuid.UUID, HistoryStep]] = []
    rolled_back: set[uuid.UUID] = set()
    for step in history:
        try:
            async with bus.transaction() as tx:
                row_id = await tx.publish(step.event, key=step.key)
                assert row_id is not None
                run.plans[row_id] = step.fault
                if not step.commit:
                    raise _Rollback
            committed.append((row_id, step))
        except _Rollback:
            assert row_id is not None
            rolled_back.add(row_id)
    await bus.drain(timeout=60, poll_interval=0.002)
    again = [bus.encode(s.event, key=s.key) for _, s in committed if s.fault.delivered_twice]
    if again:
        ids = {i: s for i, s in committed if s.fault.delivered_twice}
        async with bus.transaction() as tx:
            await tx.offer([msgspec.structs.replace(new, event_id=i) for new, i in zip(again, ids, strict=True)])
        await bus.drain(timeout=60, poll_interval=0.002)
    replay_ids = {i for i, s in committed if s.fault.replay_dead_letters}
    if replay_ids:
        letters = [d for d in await bus.dead_letters.list(limit=10_000) if d.event_id in replay_ids]
        if letters:
            for event_id in {d.event_id for d in letters}:
                run.plans[event_id] = Fault()  # the dependency recovered
            await bus.dead_letters.replay(ids=[d.id for d in letters])
            await bus.drain(timeout=60, poll_interval=0.002)
    letters = await bus.dead_letters.list(limit=10_000)
    problems: list[str] = []
    leaked = rolled_back & run.seen
    if leaked:
        problems.append(f"{len(leaked)} events from rolled-back transactions were delivered")
    dead = {(d.subscriber, d.event_id) for d in letters if d.replayed_at is None}
    for row_id, step in committed:
        for name, sub in bus.subscriptions.items():
            if step.event.__class__ not in sub.event_types:
                continue
            if run.completed.get((name, row_id), 0) == 0 and (name, row_id) not in dead:
                problems.append(f"{name} never handled {step.event!r} and it is not in the dead-letter table")
    if check is not None:
        try:
            await check(admin, [s.event for _, s in committed])
        except AssertionError as exc:
            problems.append(f"your check failed: {exc}")
    if problems:
        raise ReplayCheckFailed("; ".join(problems))


class _Rollback(Exception):
    pass


def assert_replay_safe(
    bus_factory: Callable[[str, str], EventBus | Awaitable[EventBus]],
    *,
    events: st.SearchStrategy[Any],
    check: Callable[[Connection, list[Any]], Awaitable[None]] | None = None,
    setup: Callable[[Connection], Awaitable[None]] | None = None,
    dsn: str | None = None,
    keys: st.SearchStrategy[str | None] | None = None,
    faults: st.SearchStrategy[Fault] | None = None,
    max_examples: int = 25,
    max_events: int = 6,
    handler_timeout: float = 0.2,
) -> None:
    """Check that your handlers are safe under retries, timeouts, duplicate deliveries and replays.

    ``bus_factory(dsn, schema)`` builds your ``EventBus`` (``EventBus(dsn, schema=schema)`` plus your
    ``@bus.subscribe`` handlers); each example gets a schema as a fresh one (one schema and one started bus serve
    the whole run: before each example, what your ``setup`` made there is dropped and eventbus's rows are
    emptied; an example that ends in an error gets a new schema and a new bus), and ``dsn`` puts it first on the
    ``search_path``, so ``setup(conn)`` can create your tables there and your handlers find them unqualified.
    ``setup`` and ``check`` get a new connection each example. Since the bus is built once per run, whatever your
    handlers keep in memory (a counter, a cache) lasts from one example to the next: keep such state in your
    tables, or reset it in ``setup``.
    ``check(conn, committed_events)`` is your post-condition (raise ``AssertionError``), run after every
    delivery has settled. Handler timeouts are set to ``handler_timeout``, retries follow at once, and an attempt
    planned to time out ends as a timeout at once (the harness raises ``TimeoutError`` before your handler runs,
    as the runtime does at the deadline), so that an example takes about a tenth of a second and a failing run
    reports its shrunk history in well under a minute. ``dsn`` defaults to ``EVENTBUS_TEST_DSN``, else the embedded
    server.
    """
    if dsn is None:
        import os

        dsn = os.environ.get("EVENTBUS_TEST_DSN")
        if not dsn:
            from .._embedded import _start, default_data_dir

            dsn = _start(default_data_dir())

    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        session = _Session(dsn, bus_factory, setup, handler_timeout)

        @settings(
            max_examples=max_examples, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )  # fmt: skip
        @given(histories(events, keys=keys, faults=faults, max_size=max_events))
        def replay_safe(history: list[HistoryStep]) -> None:
            note("history, in words:\n" + "\n".join(f"  {n}. {s.words()}" for n, s in enumerate(history, 1)))
            portal.call(_one_history, history, session, check)

        try:
            replay_safe()
        except BaseException:
            # The report is hypothesis's: a failure to clean up after it is logged, not raised instead of it.
            try:
                portal.call(session.close)
            except Exception:
                log.warning("could not stop the replay run's bus or drop its schema %r", session.name, exc_info=True)
            raise
        portal.call(session.close)
