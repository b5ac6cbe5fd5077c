"""The ``eventbus`` command: apply migrations, look at the outbox, the dead letters and the subscribers, run a
relay, try a demo.

Every command talks to the database through the repositories (no SQL here). Tables use ``rich`` when it is
installed (``pip install 'eventbus[cli]'``) and plain text otherwise; ``--json`` prints machine-readable output,
errors included. Errors print one line saying what went wrong and what to do; the exit code says what kind of
error it was: 1 failed, 2 usage or configuration, 3 database unreachable, 4 migrations missing.

One module per command group (``_migrate``, ``_status``, ``_dlq``, ``_subscribers``, ``_outbox``, ``_relay``,
``_demo``), the output in ``_output``, what they share in ``_common``; this module holds the parser and the entry
point.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn

import anyio

from .._driver import redact_secrets, translate
from ..errors import ConfigurationError, DatabaseUnavailable, EventBusError, MigrationsMissing
from ._common import (
    DEFAULT_SCHEMA,
    EXIT_FAILED,
    EXIT_MIGRATIONS,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    dead_letter_id,
    duration,
    letter_filters,
    log_level,
    port,
    positive,
    rate,
)
from ._consume import cmd_consume
from ._demo import DEMO_SCHEMA, cmd_demo
from ._dlq import cmd_dlq_list, cmd_dlq_purge, cmd_dlq_replay, cmd_dlq_show
from ._migrate import cmd_migrate
from ._outbox import cmd_outbox_purge
from ._output import Output, error
from ._relay import cmd_relay
from ._status import cmd_status
from ._subscribers import cmd_subscribers_list, cmd_subscribers_set

__all__ = ["build_parser", "main"]

# -- the parser ------------------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A command line that does not parse; :func:`main` reports it (as JSON with ``--json``)."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(f"{message} (see `{prog} --help`)")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are raised, for :func:`main` to report in one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message, self.prog)


def _global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """The options every command takes, before or after the command name.

    On the subcommands they default to ``SUPPRESS`` so that an option given before the command is kept.
    """
    parser.add_argument(
        "--dsn", default=default,
        help="PostgreSQL URL (default: $EVENTBUS_DSN, else the embedded server in ./.eventbus)",
    )  # fmt: skip
    parser.add_argument("--schema", default=default, help=f"schema of eventbus's tables (default: {DEFAULT_SCHEMA})")
    parser.add_argument("--tenant", default=default,
                        help="act as this tenant ('' for the default): a role confined to tenants sees its rows only; "
                             "dlq commands also pick its letters")  # fmt: skip
    parser.add_argument("--json", action="store_true", default=default, help="print machine-readable JSON")
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")


Command = Callable[[argparse.Namespace, Output], Awaitable[int]]


def _worker_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that run an application's bus: ``relay`` and ``consume``."""
    p.add_argument("--app", required=True, metavar="MODULE:ATTR",
                   help="the EventBus (or a zero-argument function returning one), e.g. myservice.events:bus")
    p.add_argument("--log-level", type=log_level, default=None, metavar="LEVEL",
                   help="debug, info (the default; debug with --debug), warning or error")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text lines (default) or one JSON object per record, fields included")
    p.add_argument("--metrics-port", type=port, default=None, metavar="PORT",
                   help="serve /metrics (Prometheus), /healthz and /readyz on this port (e.g. 9464; "
                        "needs the otel extra)")
    p.add_argument("--metrics-host", default="0.0.0.0", metavar="HOST",
                   help="the address to serve them on (default 0.0.0.0: every interface)")
    p.add_argument("--nats", metavar="URL[,URL...]",
                   help="NATS servers (default: $EVENTBUS_NATS): the relay forwards there, consumers read there "
                        "(needs the nats extra)")
    p.add_argument("--nats-creds", metavar="FILE", help="a NATS credentials (.creds) file")
    p.add_argument("--nats-nkey", metavar="FILE", help="an NKEY seed file")
    p.add_argument("--nats-tls-ca", metavar="FILE", help="CA certificates to verify the NATS servers with")
    p.add_argument("--nats-tls-cert", metavar="FILE", help="a client certificate for NATS (with --nats-tls-key)")
    p.add_argument("--nats-tls-key", metavar="FILE", help="the client certificate's key")


class _Commands:
    """Adds commands and command groups to a parser, each taking the options every command takes."""

    def __init__(self, parser: argparse.ArgumentParser, common: argparse.ArgumentParser, prefix: str = "") -> None:
        self.parser = parser
        self.subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
        self.common = common
        self.prefix = prefix  # a group's name and a space

    def command(
        self, name: str, run: Command | None, help: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self.subparsers.add_parser(
            name, parents=[self.common], help=help, description=description
        )
        parser.set_defaults(command=run, command_name=self.prefix + name)
        return parser

    def group(self, name: str, help: str) -> _Commands:
        """A command group (``eventbus NAME COMMAND``); without a command it prints its help."""
        parser = self.command(name, None, help)
        parser.set_defaults(help_parser=parser)
        return _Commands(parser, self.common, f"{self.prefix}{name} ")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eventbus", description="Transactional outbox event bus for PostgreSQL.", allow_abbrev=False)
    _global_options(parser, default=None)
    parser.set_defaults(json=False, debug=False, command=None, help_parser=parser)
    common = _Parser(add_help=False, allow_abbrev=False)
    _global_options(common, default=argparse.SUPPRESS)
    commands = _Commands(parser, common)

    p = commands.command(
        "migrate", cmd_migrate, "apply missing migrations to the schema",
        "Apply the migrations the schema lacks, in one transaction. A statement that cannot take its table lock "
        "within --lock-timeout rolls the run back, and it is tried again (for up to two minutes), so the "
        "migration never queues the outbox's traffic behind it.",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the SQL that would run; apply nothing")
    p.add_argument("--contract", action="store_true",
                   help="then remove what the migrations kept for the release before them (run it once no process "
                        "of that release runs)")
    p.add_argument("--partitioning", choices=("daily", "hourly"), default=None,
                   help="then convert the outbox to the partitioned layout (settled rows in daily or hourly "
                        "partitions that retention drops; claims read only what is pending); the outbox is locked "
                        "while it is read once. Every producer and relay must run this release or a later one")
    p.add_argument("--roles", nargs="*", metavar="TENANT", default=None,
                   help="then create the schema's roles: <schema>_relay and <schema>_consumer (every tenant), and a "
                        "<schema>_producer_<tenant> and <schema>_operator_<tenant> per TENANT (that tenant only)")
    p.add_argument("--lock-timeout", type=float, default=2.0, metavar="SECONDS",
                   help="how long a statement waits for a table lock before the run is retried (default 2)")
    commands.command("status", cmd_status, "pending and claimed events, dead letters, relays alive")
    p = commands.command(
        "relay", cmd_relay, "run a relay process for an application's bus until SIGTERM/SIGINT",
        "Import the application's EventBus and deliver its events until SIGTERM or SIGINT. --dsn and --schema "
        "override the bus's own settings only when given.",
    )  # fmt: skip
    _worker_options(p)
    p = commands.command(
        "consume", cmd_consume, "run an application's subscribers on the events a relay forwards to NATS",
        "Import the application's EventBus and run its subscribers (or those named with --subscriber) on the NATS "
        "JetStream stream that `eventbus relay --nats ...` forwards to, until SIGTERM or SIGINT. Several consumer "
        "processes share the work.",
    )  # fmt: skip
    _worker_options(p)
    p.add_argument("--subscriber", action="append", metavar="NAME", help="run only this subscriber (repeatable)")

    dlq = commands.group("dlq", "dead letters: list, show, replay, purge")
    p = dlq.command("list", cmd_dlq_list, "list dead letters, newest first")
    letter_filters(p)
    p.add_argument("--limit", type=positive, default=20, help="how many to show (default 20)")
    p.add_argument("--all", action="store_true", help="include dead letters already replayed")
    p = dlq.command("show", cmd_dlq_show, "show one dead letter in full")
    p.add_argument("id", type=dead_letter_id, help="the dead letter's id (from `eventbus dlq list`)")
    p = dlq.command(
        "replay", cmd_dlq_replay, "send dead letters back to their subscribers (once each)",
        "Re-offer unreplayed dead letters as rows targeted at their subscriber. Each letter is replayed once, "
        "however often or from however many shells this runs.",
    )  # fmt: skip
    p.add_argument("--id", type=dead_letter_id, action="append", help="a dead letter id (repeatable)")
    letter_filters(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be replayed; write nothing")
    p.add_argument("--rate", type=rate, help="at most this many letters per second (spare a recovering service)")
    p = dlq.command("purge", cmd_dlq_purge, "delete old replayed dead letters")
    p.add_argument("--older-than", type=duration, required=True, metavar="AGE", help="e.g. 30d, 12h")
    p.add_argument("--include-unreplayed", action="store_true", help="also delete letters never replayed")
    p.add_argument("--batch", type=positive, default=5000, help="letters per delete statement (default 5000)")

    subscribers = commands.group("subscribers", "registered subscribers: list, pause, resume, retire")
    subscribers.parser.set_defaults(command=cmd_subscribers_list)
    subscribers.command("list", cmd_subscribers_list, "subscribers, the relays carrying them, what waits for them")
    for verb, text in (
        ("pause", "hold a subscriber's deliveries (they wait; nothing is dead-lettered)"),
        ("resume", "deliver to a paused (or retired) subscriber again"),
        ("retire", "remove a subscriber on purpose: no event is kept for it any more"),
    ):
        p = subscribers.command(verb, cmd_subscribers_set, text)
        p.set_defaults(verb=verb)
        p.add_argument("name", help="the subscriber's name (from `eventbus subscribers`)")
        if verb == "retire":
            p.add_argument("--force", action="store_true", help="retire it although live relays still carry it")

    outbox = commands.group("outbox", "maintain the outbox table (purge)")
    p = outbox.command("purge", cmd_outbox_purge, "delete relayed rows older than an age")
    p.add_argument("--older-than", type=duration, required=True, metavar="AGE", help="e.g. 7d, 12h")
    p.add_argument("--batch", type=positive, default=5000, help="rows per delete statement (default 5000)")

    commands.command(
        "demo", cmd_demo, "see delivery, retries and dead letters at work (on its own schema)",
        "Publish a few events to two handlers, one of which times out, and explain what happened. Uses the "
        f"schema {DEMO_SCHEMA!r} unless --schema is given.",
    )  # fmt: skip
    return parser


# -- errors and the entry point --------------------------------------------------------------------------------


def _explain(exc: BaseException) -> tuple[int, str, str]:
    """The exit code for ``exc``, the one line that tells the user what happened, and the error's type name."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _explain(exc.exceptions[0])
    if not isinstance(exc, EventBusError):
        exc = translate(exc) or exc
    kind = type(exc).__name__
    if isinstance(exc, MigrationsMissing):
        return EXIT_MIGRATIONS, str(exc), kind
    if isinstance(exc, DatabaseUnavailable):
        return EXIT_UNREACHABLE, str(exc), kind
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE, str(exc), kind
    if isinstance(exc, EventBusError):
        return EXIT_FAILED, str(exc), kind
    if isinstance(exc, TimeoutError):
        return EXIT_FAILED, str(exc) or "timed out", kind
    if isinstance(exc, OSError):
        return EXIT_FAILED, f"{exc}; rerun with --debug for the traceback", kind
    return EXIT_FAILED, f"unexpected {kind}: {exc}; rerun with --debug for the traceback", kind


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``eventbus`` command with ``argv`` (default: the process's arguments); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    as_json = "--json" in argv
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        error(Output(as_json=True) if as_json else None, str(exc), code=EXIT_USAGE, kind="UsageError")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        args.help_parser.print_help(sys.stderr)
        if as_json:
            error(Output(as_json=True), f"name a command (see `{args.help_parser.prog} --help`)", code=EXIT_USAGE,
                  kind="UsageError")  # fmt: skip
        return EXIT_USAGE
    warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")  # embedded server's noise
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    dsn = args.dsn or os.environ.get("EVENTBUS_DSN") or ""
    out = Output(as_json=args.json, dsn=dsn)
    command: Command = args.command
    try:
        return anyio.run(command, args, out)
    except BrokenPipeError:  # the reader went away (`eventbus dlq list | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("eventbus: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code, message, kind = _explain(exc)
        if args.debug:
            print(redact_secrets(traceback.format_exc(), dsn), end="", file=sys.stderr)
        error(out, redact_secrets(message, dsn), code=code, kind=kind)
        return code
