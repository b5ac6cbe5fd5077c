"""``eventbus demo``: delivery, retries and dead letters at work, on a schema of its own."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import anyio
import msgspec

from .._driver import redact_dsn
from ..errors import ConfigurationError
from ..events import topic
from ..handlers import Backoff, Context
from ..relay import RelayConfig
from ..repositories import DeadLetterFilter
from ._common import EXIT_OK, command_hint, letter_document, new_bus, schema_of
from ._output import Output, count

__all__ = ["DEMO_SCHEMA", "cmd_demo"]

DEMO_SCHEMA = "eventbus_demo"


@topic("eventbus.demo.greeting")
class Greeting(msgspec.Struct, frozen=True):
    """The demo's event: someone to greet (and to send a welcome mail to)."""

    name: str


DEMO_NAMES = ("Ada", "Grace", "Linus")
DEMO_SLOW = "Grace"  # the mail server hangs for this one


async def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args, DEMO_SCHEMA)
    bus = new_bus(args, schema=schema, migrate=True, relay=True, relay_config=RelayConfig(poll_interval=0.2))
    greeted: list[str] = []
    mailed: list[str] = []
    mail_attempts: list[int] = []

    async def greeter(event: Greeting, ctx: Context) -> None:
        greeted.append(event.name)

    async def mailer(event: Greeting, ctx: Context) -> None:
        if event.name == DEMO_SLOW:
            mail_attempts.append(ctx.attempt)
            await anyio.sleep(1)  # longer than the 0.2 s timeout: every attempt times out
        mailed.append(event.name)

    bus.subscribe(name="demo.greeter", timeout=5)(greeter)
    bus.subscribe(name="demo.mailer", timeout=0.2, max_attempts=2, backoff=Backoff(initial=0.1, jitter=0.0))(mailer)

    await bus.connect()
    try:
        # The demo's relay knows only the demo's handlers: on a schema in use it would dead-letter the
        # application's events as HandlerMissing (and other relays would take the demo's). So it needs a quiet one.
        relays = await bus.relays.alive(within=RelayConfig().heartbeat_interval * 3)
        unsettled = await bus.outbox.unsettled()
    except BaseException:
        await bus.close()
        raise
    if relays or unsettled:
        await bus.close()
        in_use = f"{count(len(relays), 'relay')} alive, {count(unsettled, 'event')} pending or claimed"
        raise ConfigurationError(
            f"schema {schema!r} is in use ({in_use}); run the demo on a schema of its own, e.g. --schema {DEMO_SCHEMA}"
        )
    started = datetime.now(UTC)
    async with bus:
        async with bus.transaction() as tx:
            for name in DEMO_NAMES:
                await tx.publish(Greeting(name), key=name.lower())
        await bus.drain(timeout=30)
        stats = bus.statistics()
        letters = await bus.dead_letters.list(DeadLetterFilter(subscriber="demo.mailer", since=started))
        dsn = redact_dsn(await bus.resolve_dsn())
    if args.json:
        out.json(
            {
                "schema": schema,
                "dsn": dsn,
                "published": list(DEMO_NAMES),
                "greeted": greeted,
                "mailed": mailed,
                "retried": stats.retried,
                "dead_letters": [letter_document(d) for d in letters],
            }
        )
        return EXIT_OK
    mailed_to = ", ".join(mailed) or "nobody"
    say = out.line
    say(f"Demo on schema {schema!r} at {dsn}")
    say()
    say(f"1. Published {len(DEMO_NAMES)} Greeting events ({', '.join(DEMO_NAMES)}) in one transaction.")
    say("   They were stored in the outbox table and delivered only after the transaction committed.")
    say(f"2. The handler demo.greeter succeeded for every one: {', '.join(greeted)}.")
    say(f"3. The handler demo.mailer succeeded for {mailed_to}. For {DEMO_SLOW} it ran past its 0.2 s timeout")
    say(f"   on all {count(len(mail_attempts), 'attempt')}: it was retried {count(stats.retried, 'time')} after a "
        "short backoff, for the mailer alone (the greeter did not run again).")  # fmt: skip
    say("   After its last allowed attempt the delivery moved to the dead-letter table, reason HandlerTimeout:")
    say()
    out.table(
        ["id", "reason", "subscriber", "topic", "key", "attempts"],
        [(d.id, d.reason, d.subscriber, d.topic, d.key, d.attempts) for d in letters],
    )
    say()
    say("Look around:")
    say(f"  {command_hint(args, 'status', schema)}")
    say(f"  {command_hint(args, 'dlq list', schema)}")
    if letters:
        say(f"  {command_hint(args, f'dlq show {letters[0].id}', schema)}")
    say("Once its cause is fixed, a dead letter can be replayed (bus.dead_letters.replay(...)); replaying it twice")
    say("has one effect.")
    return EXIT_OK
