"""``eventbus outbox``: maintain the outbox table."""

from __future__ import annotations

import argparse

from ._common import EXIT_OK, connected, schema_of
from ._output import Output, Progress

__all__ = ["cmd_outbox_purge"]


async def cmd_outbox_purge(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    async with connected(args, schema) as bus:
        with Progress(out, "purging", None) as progress:
            deleted = await bus.outbox.purge(args.older_than, batch=args.batch, on_batch=progress.advance)
    if args.json:
        out.json({"deleted": deleted})
    else:
        out.line(f"deleted {deleted} relayed outbox rows older than {args.older_than} (in batches of {args.batch})")
    return EXIT_OK
