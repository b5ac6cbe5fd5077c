"""A stateful model of the outbox repository, checked step by step against a real PostgreSQL.

Hypothesis drives offers (committed and rolled back), claims by two workers, fenced settlements, lease expiry,
reclaims and "time travel" (delayed rows becoming due); after every step the database must agree with a plain
Python model of what each row's status, owner and attempt count should be.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar

import anyio.from_thread
import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from eventbus import Envelope, NewEvent, OutboxRepository, Reason, Settlement, Status
from eventbus.sql import quote_schema

WORKERS = ("A", "B")
LEASE = 60.0
LONG_DELAY = 3600.0
MAX_EXAMPLES = int(os.environ.get("EVENTBUS_MACHINE_EXAMPLES", "200"))


@dataclass
class Env:
    """What the machine needs from the test: a portal into an event loop, a pool on it, the schema."""

    portal: anyio.from_thread.BlockingPortal
    pool: asyncpg.Pool
    schema: str
    repo: OutboxRepository
    examples: int = 0
    steps: int = 0

    def run(self, func: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        return self.portal.call(func, *args)


async def _settle_relayed(repo: OutboxRepository, worker: str, envelopes: list[Envelope]) -> int:
    settlement = Settlement()
    for envelope in envelopes:
        settlement.mark(envelope, Status.RELAYED)
    return await repo.settle(worker, settlement)


async def _settle_failed(
    repo: OutboxRepository, worker: str, envelope: Envelope, *, error: str, retry_in: float | None, reason: Reason
) -> int:
    """Send a claimed row back to pending after ``retry_in`` seconds or, without it, dead-letter it."""
    settlement = Settlement()
    if retry_in is not None:
        settlement.mark(envelope, Status.PENDING, delay=retry_in, error=error)
    else:
        settlement.mark(envelope, Status.DEAD, error=error)
        settlement.dead_letter(envelope, reason, envelope.target, error=error)
    return await repo.settle(worker, settlement)


@dataclass
class ModelRow:
    id: uuid.UUID
    tenant: str
    idempotency_key: str | None
    status: Status = Status.PENDING
    attempts: int = 0
    due: bool = True
    claimed_by: str | None = None
    lease_valid: bool = False


@dataclass
class Model:
    rows: dict[uuid.UUID, ModelRow] = field(default_factory=dict)
    keys: set[tuple[str, str]] = field(default_factory=set)
    dead: dict[uuid.UUID, str] = field(default_factory=dict)
    rolled_back: set[uuid.UUID] = field(default_factory=set)
    # Every envelope a worker was ever handed, stale ones included: settling those must settle nothing.
    held: dict[str, list[Envelope]] = field(default_factory=lambda: {w: [] for w in WORKERS})

    def expected_slots(self, events: list[NewEvent]) -> list[bool]:
        """Which events of one offer insert a row (a repeated (tenant, key) inserts nothing, even in-batch)."""
        seen = set(self.keys)
        slots = []
        for event in events:
            key = None if event.idempotency_key is None else (event.tenant, event.idempotency_key)
            if key is not None and key in seen:
                slots.append(False)
            else:
                slots.append(True)
                if key is not None:
                    seen.add(key)
        return slots

    def holds(self, worker: str, envelope: Envelope) -> bool:
        """Whether a settle of ``envelope`` by ``worker`` must settle its row (the fence)."""
        row = self.rows[envelope.id]
        return row.status == Status.CLAIMED and row.claimed_by == worker and row.attempts == envelope.attempts


event_specs = st.lists(
    st.builds(
        lambda tenant, key, delay: NewEvent(
            topic="machine", payload=b'{"n": 1}', tenant=tenant, idempotency_key=key, delay=delay
        ),
        st.sampled_from(["", "t1"]),
        st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"])),
        st.sampled_from([0.0, 0.0, 0.0, LONG_DELAY]),
    ),
    min_size=1,
    max_size=5,
)


class OutboxMachine(RuleBasedStateMachine):
    env: ClassVar[Env]

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()

    # -- database helpers (run on the portal's event loop) -------------------------------------------------

    @property
    def table(self) -> str:
        return f"{quote_schema(self.env.schema)}.eventbus_outbox"

    @property
    def dead_table(self) -> str:
        return f"{quote_schema(self.env.schema)}.eventbus_dead_letters"

    async def _truncate(self) -> None:
        schema = quote_schema(self.env.schema)
        await self.env.pool.execute(
            f"TRUNCATE {schema}.eventbus_outbox, {schema}.eventbus_dead_letters, {schema}.eventbus_inbox"
        )

    async def _offer(self, events: list[NewEvent], commit: bool) -> tuple[uuid.UUID | None, ...]:
        async with self.env.pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                result = await self.env.repo.offer(conn, events)
            except BaseException:
                await tx.rollback()
                raise
            if commit:
                await tx.commit()
            else:
                await tx.rollback()
        return result.ids

    async def _db_clock(self) -> datetime:
        value = await self.env.pool.fetchval("SELECT clock_timestamp()")
        assert isinstance(value, datetime)
        return value

    # -- rules ---------------------------------------------------------------------------------------------

    @initialize()
    def start_empty(self) -> None:
        self.env.examples += 1
        self.env.run(self._truncate)

    @rule(events=event_specs)
    def offer_and_commit(self, events: list[NewEvent]) -> None:
        self.env.steps += 1
        slots = self.model.expected_slots(events)
        ids = self.env.run(self._offer, events, True)
        assert [i is not None for i in ids] == slots, "a repeated idempotency key must insert nothing"
        for event, row_id in zip(events, ids, strict=True):
            if row_id is None:
                continue
            self.model.rows[row_id] = ModelRow(row_id, event.tenant, event.idempotency_key, due=event.delay == 0)
            if event.idempotency_key is not None:
                self.model.keys.add((event.tenant, event.idempotency_key))

    @rule(events=event_specs)
    def offer_and_roll_back(self, events: list[NewEvent]) -> None:
        self.env.steps += 1
        slots = self.model.expected_slots(events)
        ids = self.env.run(self._offer, events, False)
        assert [i is not None for i in ids] == slots
        self.model.rolled_back.update(i for i in ids if i is not None)

    @rule(worker=st.sampled_from(WORKERS), limit=st.integers(1, 6))
    def claim(self, worker: str, limit: int) -> None:
        self.env.steps += 1
        pending = [r for r in self.model.rows.values() if r.status == Status.PENDING]
        # Fair across tenants: each tenant with pending rows offers its oldest due rows, up to 2/n of the batch
        # (at least 50) when n tenants have pending rows, and the batch takes them in turn.
        tenants = {r.tenant for r in pending}
        quota = min(limit, max(50, math.ceil(2 * limit / len(tenants)))) if tenants else 0
        offered = []
        for tenant in tenants:
            due = sorted(r.id for r in pending if r.tenant == tenant and r.due)[:quota]
            offered += [(turn, row_id) for turn, row_id in enumerate(due)]
        expected = sorted(row_id for _, row_id in sorted(offered)[:limit])
        held_elsewhere = {r.id for r in self.model.rows.values() if r.status == Status.CLAIMED and r.lease_valid}
        claimed: list[Envelope] = self.env.run(self.env.repo.claim, limit, LEASE, worker)
        got = [e.id for e in claimed]
        assert got == expected, "a claim takes each tenant's smallest-id due pending rows in turn, in id order"
        assert not set(got) & self.model.rolled_back, "a rolled-back offer was claimed"
        assert not set(got) & held_elsewhere, "a row was claimed while another lease on it was valid"
        for envelope in claimed:
            row = self.model.rows[envelope.id]
            assert envelope.attempts == row.attempts + 1, "the attempt is counted at claim time"
            row.status, row.claimed_by, row.lease_valid = Status.CLAIMED, worker, True
            row.attempts += 1
        self.model.held[worker].extend(claimed)

    @precondition(lambda self: any(self.model.held.values()))
    @rule(data=st.data())
    def settle_relayed(self, data: st.DataObject) -> None:
        self.env.steps += 1
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.model.held[w]]), label="worker")
        envelopes = data.draw(
            st.lists(
                st.sampled_from(self.model.held[worker]),
                min_size=1,
                max_size=4,
                unique_by=lambda e: (e.id, e.attempts),
            ),
            label="envelopes",
        )
        winners = [e for e in envelopes if self.model.holds(worker, e)]
        settled = self.env.run(_settle_relayed, self.env.repo, worker, envelopes)
        assert settled == len(winners), "a settle must settle exactly the rows the worker still holds"
        for envelope in winners:
            row = self.model.rows[envelope.id]
            row.status, row.claimed_by, row.lease_valid = Status.RELAYED, None, False

    @precondition(lambda self: any(self.model.held.values()))
    @rule(
        data=st.data(),
        outcome=st.sampled_from([0.0, LONG_DELAY, None]),
        reason=st.sampled_from(list(Reason)),
    )
    def settle_failed(self, data: st.DataObject, outcome: float | None, reason: Reason) -> None:
        self.env.steps += 1
        worker = data.draw(st.sampled_from([w for w in WORKERS if self.model.held[w]]), label="worker")
        envelope = data.draw(st.sampled_from(self.model.held[worker]), label="envelope")
        holds = self.model.holds(worker, envelope)
        before = self.env.run(self._db_clock)
        settled = self.env.run(
            lambda: _settle_failed(
                self.env.repo, worker, envelope, error=f"boom from {worker}", retry_in=outcome, reason=reason
            )
        )
        after = self.env.run(self._db_clock)
        assert settled == (1 if holds else 0), "a fenced-out settle must settle nothing"
        if not holds:
            return
        row = self.model.rows[envelope.id]
        row.claimed_by, row.lease_valid = None, False
        stored = self.env.run(self.env.repo.get, envelope.id)
        assert stored["last_error"] == f"boom from {worker}"
        if outcome is None:
            row.status = Status.DEAD
            self.model.dead[envelope.id] = str(reason)
        else:
            row.status, row.due = Status.PENDING, outcome == 0
            backoff = timedelta(seconds=outcome)
            assert stored["available_at"] >= before + backoff, "a failed row came back before its backoff"
            assert stored["available_at"] <= after + backoff

    @precondition(lambda self: any(r.status == Status.CLAIMED and r.lease_valid for r in self.model.rows.values()))
    @rule(worker=st.sampled_from(WORKERS))
    def lease_expires(self, worker: str) -> None:
        self.env.steps += 1
        # Test-only SQL: the worker stalled for longer than its lease.
        self.env.run(
            self.env.pool.execute,
            f"UPDATE {self.table} SET claimed_until = now() - interval '1 second' WHERE claimed_by = $1 AND status = 1",
            worker,
        )
        for row in self.model.rows.values():
            if row.status == Status.CLAIMED and row.claimed_by == worker:
                row.lease_valid = False

    @rule()
    def reclaim(self) -> None:
        self.env.steps += 1
        expired = [r for r in self.model.rows.values() if r.status == Status.CLAIMED and not r.lease_valid]
        reclaimed = self.env.run(self.env.repo.reclaim)
        assert reclaimed == len(expired)
        for row in expired:
            row.status, row.claimed_by, row.due = Status.PENDING, None, True

    @precondition(lambda self: any(not r.due for r in self.model.rows.values()))
    @rule()
    def time_travel(self) -> None:
        """Delayed rows (and rows backing off) become due."""
        self.env.steps += 1
        self.env.run(
            self.env.pool.execute,
            f"UPDATE {self.table} SET available_at = now() - interval '1 second' WHERE available_at > now()",
        )
        for row in self.model.rows.values():
            row.due = True

    # -- the database agrees with the model after every step -----------------------------------------------

    async def _snapshot(self) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        rows = await self.env.pool.fetch(
            f"SELECT id, status, attempts, claimed_by, available_at <= now() AS due, "
            f"claimed_until > now() AS lease_valid FROM {self.table}"
        )
        dead = await self.env.pool.fetch(f"SELECT outbox_id, reason, error FROM {self.dead_table}")
        return rows, dead

    @invariant()
    def database_matches_model(self) -> None:
        rows, dead = self.env.run(self._snapshot)
        by_id = {r["id"]: r for r in rows}
        assert by_id.keys() == self.model.rows.keys()
        assert not by_id.keys() & self.model.rolled_back
        for row_id, expected in self.model.rows.items():
            actual = by_id[row_id]
            state = (actual["status"], actual["attempts"], actual["claimed_by"])
            assert state == (expected.status, expected.attempts, expected.claimed_by), row_id
            if expected.status == Status.PENDING:
                assert actual["due"] == expected.due, row_id
            if expected.status == Status.CLAIMED:
                assert actual["lease_valid"] == expected.lease_valid, row_id
        assert {d["outbox_id"]: d["reason"] for d in dead} == self.model.dead, "dead letters carry their reason"
        assert len(dead) == len(self.model.dead), "one dead letter per dead-lettered row"


def test_outbox_repository_matches_model(eventbus_dsn: str, eventbus_schema: str, anyio_backend: str) -> None:
    with anyio.from_thread.start_blocking_portal(anyio_backend) as portal:

        async def open_pool() -> asyncpg.Pool:
            return await asyncpg.create_pool(eventbus_dsn, min_size=1, max_size=2)

        pool = portal.call(open_pool)
        try:
            OutboxMachine.env = Env(portal, pool, eventbus_schema, OutboxRepository(pool, eventbus_schema))
            run_state_machine_as_test(
                OutboxMachine,
                settings=settings(
                    max_examples=MAX_EXAMPLES,
                    stateful_step_count=25,
                    deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                ),
            )
        finally:
            portal.call(pool.close)
    env = OutboxMachine.env
    print(f"\nrepository machine: {env.examples} examples, {env.steps} steps")
    assert env.examples > 0
