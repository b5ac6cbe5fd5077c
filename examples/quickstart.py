"""eventbus in one file: publish an event in your own transaction, watch it delivered, retried and dead-lettered.

Run it with ``python examples/quickstart.py``. Without ``EVENTBUS_DSN`` it starts an embedded PostgreSQL in
``./.eventbus`` (the first start takes a few seconds); with ``EVENTBUS_DSN=postgresql://...`` it uses that server.
eventbus keeps its tables in the schema ``quickstart``; the example's own two tables are
``quickstart_users`` and ``quickstart_newsletter``.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import anyio
import msgspec

from eventbus import Backoff, Context, DeadLetterFilter, EventBus

SCHEMA = "quickstart"


# 1. An event: a frozen msgspec Struct. Its topic is the class name.
class UserSignedUp(msgspec.Struct, frozen=True):
    user_id: str
    email: str


# 2. The bus. No DSN: EVENTBUS_DSN if set, else the embedded server.
bus = EventBus(schema=SCHEMA)

welcomed: list[str] = []
crm_attempts: list[int] = []


# 3. Handlers. The annotation of the first parameter picks the events a handler receives.
@bus.subscribe(name="quickstart.send_welcome", timeout=5)
async def send_welcome(event: UserSignedUp, ctx: Context) -> None:
    """Succeeds at once (here it only remembers whom it welcomed)."""
    welcomed.append(event.email)


@bus.subscribe(name="quickstart.add_to_newsletter", timeout=5, transactional=True)
async def add_to_newsletter(event: UserSignedUp, ctx: Context) -> None:
    """Writes on ctx.connection: this insert commits together with the "done" mark of this delivery, so even if
    the event is delivered again (a crash, a replay) the subscriber row is inserted exactly once."""
    await ctx.connection.execute(
        "INSERT INTO quickstart_newsletter (user_id, email) VALUES ($1, $2)", event.user_id, event.email
    )


@bus.subscribe(name="quickstart.sync_to_crm", timeout=0.2, max_attempts=2, backoff=Backoff(initial=0.1, jitter=0))
async def sync_to_crm(event: UserSignedUp, ctx: Context) -> None:
    """The CRM is down: every call hangs longer than the 0.2 s timeout."""
    crm_attempts.append(ctx.attempt)
    await anyio.sleep(2)


async def main() -> None:
    user_id = f"u-{secrets.token_hex(3)}"
    email = f"ada-{user_id}@example.com"
    started = datetime.now(UTC)

    # 4. Start the bus: connects, applies eventbus's migrations, starts the relay and the handlers.
    async with bus:
        async with bus.transaction() as tx:
            await tx.connection.execute(
                "CREATE TABLE IF NOT EXISTS quickstart_users (id text PRIMARY KEY, email text NOT NULL);"
                "CREATE TABLE IF NOT EXISTS quickstart_newsletter (user_id text PRIMARY KEY, email text NOT NULL)"
            )

        # 5. Your business write and the event commit together, or neither does.
        async with bus.transaction() as tx:
            await tx.connection.execute("INSERT INTO quickstart_users (id, email) VALUES ($1, $2)", user_id, email)
            await tx.publish(UserSignedUp(user_id, email), key=user_id)

        # 6. Wait until every committed event is handled or dead-lettered.
        await bus.drain(timeout=30)

        stats = bus.statistics()
        on_list = await bus.pool.fetchval("SELECT count(*) FROM quickstart_newsletter WHERE user_id = $1", user_id)
        letters = await bus.dead_letters.list(DeadLetterFilter(since=started))

    print(f"Saved user {user_id} and published UserSignedUp in the same transaction.")
    print("After the commit the relay handed the event to three handlers:")
    print(f"  - send_welcome succeeded: welcomed {', '.join(welcomed)}.")
    print(f"  - add_to_newsletter succeeded: {on_list} row written in the handler's own transaction.")
    retried = "once" if stats.retried == 1 else f"{stats.retried} times"
    print(f"  - sync_to_crm ran {len(crm_attempts)} times and each attempt exceeded its 0.2 s timeout.")
    print(f"    It was retried {retried} after a short pause, on its own: the other two handlers did not run again.")
    print("    It was allowed 2 attempts, so the delivery moved to the dead-letter table:")
    for letter in letters:
        print(f"      {letter.id}  reason={letter.reason}  subscriber={letter.subscriber}  error={letter.error!r}")
    print()
    print("Dead letters stay until you deal with them. Once the CRM is back, replay them from Python:")
    print('    await bus.dead_letters.replay(DeadLetterFilter(subscriber="quickstart.sync_to_crm"))')
    print("which sends each one again to that handler alone (replaying twice has one effect). To look at them:")
    print(f"    eventbus dlq list --schema {SCHEMA}")
    print(f"    eventbus status --schema {SCHEMA}")


if __name__ == "__main__":
    anyio.run(main)
