"""The ``eventbus`` command: apply migrations, look at the outbox and the dead letters, run a relay, try a demo.

Every command talks to the database through the repositories (no SQL here). Tables use ``rich`` when it is
installed (``pip install 'eventbus[cli]'``) and plain text otherwise; ``--json`` prints machine-readable output,
errors included. Errors print one line saying what went wrong and what to do; the exit code says what kind of
error it was: 1 failed, 2 usage or configuration, 3 database unreachable, 4 migrations missing.

One module per command group (``_migrate``, ``_status``, ``_dlq``, ``_outbox``, ``_relay``, ``_demo``), the
output in ``_output``, what they share in ``_common``; this module holds the parser and the entry point.
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

from .._driver import redact_dsn, translate
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
    positive,
    rate,
)
from ._demo import DEMO_SCHEMA, cmd_demo
from ._dlq import cmd_dlq_list, cmd_dlq_purge, cmd_dlq_replay, cmd_dlq_show
from ._migrate import cmd_migrate
from ._outbox import cmd_outbox_purge
from ._output import Output, error
from ._relay import cmd_relay
from ._status import cmd_status

__all__ = ["build_parser", "main"]

# -- the parser ------------------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A command line that does not parse; :func:`main` reports it (as JSON with ``--json``)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are raised, for :func:`main` to report in one line with exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """The options every command takes, before or after the command name.

    On the subcommands they default to ``SUPPRESS`` so that an option given before the command is kept.
    """
    parser.add_argument(
        "--dsn", default=default,
        help="PostgreSQL URL (default: $EVENTBUS_DSN, else the embedded server in ./.eventbus)",
    )  # fmt: skip
    parser.add_argument("--schema", default=default, help=f"schema of eventbus's tables (default: {DEFAULT_SCHEMA})")
    parser.add_argument("--json", action="store_true", default=default, help="print machine-readable JSON")
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")


Command = Callable[[argparse.Namespace, Output], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eventbus", description="Transactional outbox event bus for PostgreSQL.")
    _global_options(parser, default=None)
    parser.set_defaults(json=False, debug=False)
    common = _Parser(add_help=False)
    _global_options(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = commands.add_parser("migrate", parents=[common], help="apply missing migrations to the schema")
    p.set_defaults(command=cmd_migrate)

    p = commands.add_parser("status", parents=[common], help="pending and in-flight events, dead letters, relays alive")
    p.set_defaults(command=cmd_status)

    p = commands.add_parser(
        "relay", parents=[common], help="run a relay process for an application's bus until SIGTERM/SIGINT",
        description="Import the application's EventBus and deliver its events until SIGTERM or SIGINT. "
        "--dsn and --schema override the bus's own settings only when given.",
    )  # fmt: skip
    p.add_argument(
        "--app",
        required=True,
        metavar="MODULE:ATTR",
        help="the EventBus (or a zero-argument function returning one), e.g. myservice.events:bus",
    )
    p.set_defaults(command=cmd_relay)

    dlq = commands.add_parser("dlq", parents=[common], help="dead letters: list, show, replay, purge")
    dlq_commands = dlq.add_subparsers(title="commands", metavar="COMMAND")
    dlq.set_defaults(command=None, help_parser=dlq)
    p = dlq_commands.add_parser("list", parents=[common], help="list dead letters, newest first")
    letter_filters(p)
    p.add_argument("--limit", type=positive, default=20, help="how many to show (default 20)")
    p.add_argument("--all", action="store_true", help="include dead letters already replayed")
    p.set_defaults(command=cmd_dlq_list)
    p = dlq_commands.add_parser("show", parents=[common], help="show one dead letter in full")
    p.add_argument("id", type=dead_letter_id, help="the dead letter's id (from `eventbus dlq list`)")
    p.set_defaults(command=cmd_dlq_show)
    p = dlq_commands.add_parser(
        "replay", parents=[common], help="send dead letters back to their subscribers (once each)",
        description="Re-offer unreplayed dead letters as rows targeted at their subscriber. Each letter is "
        "replayed once, however often or from however many shells this runs.",
    )  # fmt: skip
    p.add_argument("--id", type=dead_letter_id, action="append", help="a dead letter id (repeatable)")
    letter_filters(p)
    p.add_argument("--dry-run", action="store_true", help="say what would be replayed; write nothing")
    p.add_argument("--rate", type=rate, help="at most this many letters per second (spare a recovering service)")
    p.set_defaults(command=cmd_dlq_replay)
    p = dlq_commands.add_parser("purge", parents=[common], help="delete old replayed dead letters")
    p.add_argument("--older-than", type=duration, required=True, metavar="AGE", help="e.g. 30d, 12h")
    p.add_argument("--include-unreplayed", action="store_true", help="also delete letters never replayed")
    p.add_argument("--batch", type=positive, default=5000, help="letters per delete statement (default 5000)")
    p.set_defaults(command=cmd_dlq_purge)

    outbox = commands.add_parser("outbox", parents=[common], help="maintain the outbox table (purge)")
    outbox_commands = outbox.add_subparsers(title="commands", metavar="COMMAND")
    outbox.set_defaults(command=None, help_parser=outbox)
    p = outbox_commands.add_parser("purge", parents=[common], help="delete relayed rows older than an age")
    p.add_argument("--older-than", type=duration, required=True, metavar="AGE", help="e.g. 7d, 12h")
    p.add_argument("--batch", type=positive, default=5000, help="rows per delete statement (default 5000)")
    p.set_defaults(command=cmd_outbox_purge)

    p = commands.add_parser(
        "demo", parents=[common], help="see delivery, retries and dead letters at work (on its own schema)",
        description=f"Publish a few events to two handlers, one of which times out, and explain what happened. "
        f"Uses the schema {DEMO_SCHEMA!r} unless --schema is given.",
    )  # fmt: skip
    p.set_defaults(command=cmd_demo)
    parser.set_defaults(command=None, help_parser=parser)
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
    return EXIT_FAILED, f"unexpected {kind}: {exc}; rerun with --debug for the traceback", kind


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``eventbus`` command with ``argv`` (default: the process's arguments); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    as_json = "--json" in argv
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        error(Output(as_json=True) if as_json else None, f"{exc} (see `{parser.prog} --help`)", code=EXIT_USAGE,
              kind="UsageError")  # fmt: skip
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        args.help_parser.print_help(sys.stderr)
        return EXIT_USAGE
    warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")  # embedded server's noise
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    out = Output(as_json=args.json)
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
            traceback.print_exc()
        error(out, redact_dsn(message), code=code, kind=kind)
        return code


if __name__ == "__main__":
    sys.exit(main())
