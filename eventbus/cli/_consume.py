"""``eventbus consume``: run an application's subscribers on the events a relay forwards to NATS JetStream, until
SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import os
import signal

import anyio

from ..errors import ConfigurationError
from ._common import EXIT_OK
from ._output import Output, count
from ._relay import nats_shown, prepare

__all__ = ["cmd_consume"]


async def cmd_consume(args: argparse.Namespace, out: Output) -> int:
    bus = prepare(args)
    broker = nats_shown(bus)
    if broker is None:
        raise ConfigurationError(
            "eventbus consume reads a NATS stream: give --nats nats://HOST:4222 (or EVENTBUS_NATS), or build the bus "
            "with EventBus(transport=NatsTransport(...)); with the in-process transport, `eventbus relay` runs the "
            "subscribers itself"
        )
    names = args.subscriber or sorted(bus.subscriptions)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with bus.consumer(names) as consumer:
            if args.json:
                out.json({"event": "started", "schema": bus.schema, "nats": broker, "subscribers": names,
                          "pid": os.getpid()}, compact=True)  # fmt: skip
            else:
                out.line(f"consumer started on schema {bus.schema!r} from NATS at {broker} for {len(names)} "
                         f"subscribers ({', '.join(names)}); stop it with Ctrl+C or SIGTERM")  # fmt: skip
            async for signum in signals:
                if not args.json:
                    out.line(f"{signal.Signals(signum).name} received: finishing the handlers that run (up to "
                             f"{bus.stop_timeout:g} s), then stopping")  # fmt: skip
                break
        stats = consumer.statistics()
    await bus.close()
    if args.json:
        out.json({"event": "stopped", "delivered": stats.delivered, "retried": stats.retried,
                  "dead_lettered": stats.dead_lettered}, compact=True)  # fmt: skip
    else:
        out.line(f"consumer stopped: {count(stats.delivered, 'delivery', 'deliveries')}, "
                 f"{count(stats.retried, 'retry', 'retries')} scheduled, "
                 f"{stats.dead_lettered} dead-lettered")  # fmt: skip
    return EXIT_OK
