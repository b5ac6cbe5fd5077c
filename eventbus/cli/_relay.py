"""``eventbus relay``: run a relay for an application's bus until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import signal
import sys
from typing import Any

import anyio

from .._driver import redact_dsn
from ..bus import EventBus
from ..errors import ConfigurationError
from ..observability import logs
from ._common import EXIT_OK
from ._output import Output, count

__all__ = ["cmd_relay", "load_app"]


def load_app(spec: str) -> EventBus:
    """Import ``module:attribute`` and return the EventBus it names (or that a zero-argument callable returns)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"--app {spec!r} must be module:attribute, for example myservice.events:bus")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the project folder's modules are importable
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigurationError(
                f"cannot import {module_name!r} for --app ({exc}); run from your project folder or add it to PYTHONPATH"
            ) from exc
        raise
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attribute!r} (from --app)") from None
    if not isinstance(target, EventBus) and callable(target):
        try:
            inspect.signature(target).bind()
        except TypeError:
            raise ConfigurationError(
                f"--app {spec} is a function that needs arguments; name an EventBus or a zero-argument function "
                "returning one"
            ) from None
        except ValueError:
            pass  # no signature to inspect (a builtin): just call it
        if inspect.iscoroutinefunction(target):
            raise ConfigurationError(f"--app {spec} is an async function; make it a plain function returning the bus")
        target = target()
    if not isinstance(target, EventBus):
        raise ConfigurationError(
            f"--app {spec} is a {type(target).__name__}, not an EventBus (or a zero-argument function returning one)"
        )
    return target


def prepare(args: argparse.Namespace) -> EventBus:
    """Logging as the options say, and the application's bus with the options' DSN, schema, metrics port and
    NATS servers applied (what ``relay`` and ``consume`` share)."""
    logs.configure(args.log_level or ("DEBUG" if args.debug else "INFO"), args.log_format)
    if not args.debug:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    bus = load_app(args.app)
    if bus.relay is not None:
        raise ConfigurationError(f"the bus from --app {args.app} is already running; pass one that is not started")
    if args.dsn:
        bus.dsn = args.dsn
    if args.schema:
        bus.schema = args.schema
    if args.metrics_port is not None:
        bus.metrics_port = args.metrics_port
        bus.metrics_host = args.metrics_host
    servers = args.nats or os.environ.get("EVENTBUS_NATS")
    if servers:
        from ..transports.nats import NatsTransport

        tls = None
        if args.nats_tls_ca or args.nats_tls_cert:
            import ssl

            tls = ssl.create_default_context(cafile=args.nats_tls_ca)
            if args.nats_tls_cert:
                tls.load_cert_chain(args.nats_tls_cert, args.nats_tls_key)
        listed = [server.strip() for server in servers.split(",") if server.strip()]
        if isinstance(bus.transport, NatsTransport):
            # The application's own NATS settings stay (windows, ack wait, credentials); the options override.
            bus.transport.servers = listed
            for option, value in (("credentials", args.nats_creds), ("nkeys_seed", args.nats_nkey), ("tls", tls)):
                if value is not None:
                    bus.transport.settings[option] = value
        else:
            bus.transport = NatsTransport(listed, credentials=args.nats_creds, nkeys_seed=args.nats_nkey, tls=tls)
    return bus


def nats_shown(bus: EventBus) -> str | None:
    """The NATS servers of the bus's transport, credentials hidden; None for an in-process transport."""
    from ..transports.nats import NatsTransport, redact_nats_url

    transport = bus.transport
    if not isinstance(transport, NatsTransport):
        return None
    servers = [transport.servers] if isinstance(transport.servers, str) else list(transport.servers)
    return ", ".join(redact_nats_url(server) for server in servers)


async def cmd_relay(args: argparse.Namespace, out: Output) -> int:
    bus = prepare(args)
    if not bus.subscriptions:
        raise ConfigurationError(
            f"the bus from --app {args.app} has no subscribers: import the modules that define its handlers from "
            f"{args.app.partition(':')[0]!r} (a relay without subscribers would dead-letter every event)"
        )
    bus.run_relay = True
    subscribers = sorted(bus.subscriptions)
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            await bus.start()
            relay = bus.relay
            worker = relay.worker if relay is not None else "?"
            dsn = redact_dsn(await bus.resolve_dsn())
            broker = nats_shown(bus)
            served = bus.metrics_address
            metrics_url = f"http://{served[0]}:{served[1]}/metrics" if served is not None else None
            if args.json:
                out.json({"event": "started", "worker": worker, "schema": bus.schema, "dsn": dsn,
                          "subscribers": subscribers, "pid": os.getpid(), "metrics": metrics_url, "nats": broker},
                         compact=True)  # fmt: skip
            else:
                out.line(
                    f"relay {worker} started on schema {bus.schema!r} at {dsn} with "
                    f"{len(subscribers)} subscribers ({', '.join(subscribers)}); stop it with Ctrl+C or SIGTERM"
                )
                if broker is not None:
                    out.line(f"forwarding to NATS at {broker}; handlers run in `eventbus consume` processes")
                if metrics_url is not None:
                    out.line(f"metrics at {metrics_url} (health: /healthz, /readyz)")
            async for signum in signals:
                if not args.json:
                    out.line(
                        f"{signal.Signals(signum).name} received: finishing the work in hand "
                        f"(up to {bus.stop_timeout:g} s), then stopping"
                    )
                break
        finally:
            await bus.stop()
    stats = bus.statistics()
    if args.json:
        out.json({"event": "stopped", "worker": worker, "delivered": stats.delivered, "retried": stats.retried,
                  "dead_lettered": stats.dead_lettered}, compact=True)  # fmt: skip
    else:
        out.line(
            f"relay {worker} stopped: {count(stats.delivered, 'delivery', 'deliveries')}, "
            f"{count(stats.retried, 'retry', 'retries')} scheduled, "
            f"{stats.dead_lettered} dead-lettered"
        )
    return EXIT_OK
