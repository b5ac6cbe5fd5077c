"""Dead letters for tests, written the way a relay writes them: a row is offered, claimed and settled dead."""

from __future__ import annotations

import uuid

from eventbus import EventBus, NewEvent, Reason, Settlement, Status


async def dead_letter(
    bus: EventBus,
    *,
    reason: Reason,
    event_id: uuid.UUID,
    topic: str,
    payload: bytes,
    subscriber: str | None = None,
    key: str | None = None,
    tenant: str = "",
    headers: dict[str, str] | None = None,
    attempts: int = 0,
    error_type: str | None = None,
    error: str | None = None,
) -> tuple[uuid.UUID, uuid.UUID]:
    """Write one dead letter; return its id and the id of the outbox row it came from."""
    event = NewEvent(
        topic=topic, payload=payload, key=key, target=subscriber, tenant=tenant, headers=headers or {},
        event_id=event_id,
    )  # fmt: skip
    async with bus.transaction() as tx:
        (row_id,) = (await tx.offer([event])).ids
    assert row_id is not None
    worker = f"test-{uuid.uuid4().hex[:6]}"
    owned = await bus.relays.acquire(worker, range(32), 30.0)  # keyed rows are claimed by their partition's owner
    claimed = await bus.outbox.claim(10_000, 30.0, worker)
    settlement = Settlement()
    letters = []
    for row in claimed:
        if row.id == row_id:
            settlement.mark(row, Status.DEAD, error=error)
            letters.append(
                settlement.dead_letter(row, reason, subscriber, error_type=error_type, error=error, attempts=attempts)
            )
        else:
            settlement.mark(row, Status.PENDING)
    assert await bus.outbox.settle(worker, settlement) == len(claimed)
    await bus.relays.release(worker, list(owned))
    assert len(letters) == 1, "the offered row was claimed"
    return letters[0], row_id
