"""``eventbus subscribers``: the subscribers the relays registered; pause, resume and retire them."""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from ..errors import EventBusError
from ..relay import RelayConfig
from ..repositories import SubscriberState, SubscriptionInfo
from ._common import EXIT_OK, command_hint, connected, schema_of
from ._output import Output, age, since

__all__ = ["cmd_subscribers_list", "cmd_subscribers_set"]

#: A relay counts as carrying a subscriber while its heartbeat is this recent (seconds).
_LIVE_WITHIN = RelayConfig().heartbeat_interval * 3

_VERBS = {"pause": SubscriberState.PAUSED, "resume": SubscriberState.ACTIVE, "retire": SubscriberState.RETIRED}

_EFFECT = {
    SubscriberState.PAUSED: "its deliveries wait (nothing is dead-lettered) until "
    "`eventbus subscribers resume {name}`; rows already in a relay's hands finish",
    SubscriberState.ACTIVE: "relays deliver to it again, its waiting rows first",
    SubscriberState.RETIRED: "no event is kept for it any more; rows still waiting for it end as HandlerMissing "
    "dead letters (replayable). A relay that starts with it registers it again",
}


def _document(info: SubscriptionInfo) -> dict[str, Any]:
    document: dict[str, Any] = msgspec.to_builtins(info)
    return document


async def cmd_subscribers_list(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    async with connected(args, schema) as bus:
        found = await bus.subscribers.list(live_within=_LIVE_WITHIN)
    if args.json:
        out.json({"subscribers": [_document(info) for info in found]})
        return EXIT_OK
    if not found:
        out.line(f"no subscriber is registered in schema {schema!r}: relays register theirs when they start")
        return EXIT_OK
    out.table(
        ["name", "state", "topics", "relays", "last seen", "waiting", "lag"],
        [
            (info.name, info.state + (" (ordered)" if info.ordered else ""), ", ".join(info.topics),
             len(info.relays) or "none", since(info.last_seen), info.backlog, age(info.lag_seconds))
            for info in found
        ],
    )  # fmt: skip
    orphans = [info.name for info in found if not info.relays and info.state != SubscriberState.RETIRED]
    if orphans:
        out.line()
        hint = command_hint(args, "subscribers retire NAME", schema)
        out.line(f"carried by no live relay: {', '.join(orphans)}. Their events wait for them; deploy a relay "
                 f"that carries them, or retire them: {hint}")  # fmt: skip
    return EXIT_OK


async def cmd_subscribers_set(args: argparse.Namespace, out: Output) -> int:
    schema = schema_of(args)
    state = _VERBS[args.verb]
    async with connected(args, schema) as bus:
        (info,) = await bus.subscribers.list(live_within=_LIVE_WITHIN, name=args.name) or (None,)
        if info is None:
            known = [each.name for each in await bus.subscribers.list(live_within=_LIVE_WITHIN)]
            listed = f"registered: {', '.join(known)}" if known else "none is: relays register theirs when they start"
            raise EventBusError(f"no subscriber named {args.name!r} is registered in schema {schema!r} ({listed})")
        if state == SubscriberState.RETIRED and info.relays and not args.force:
            raise EventBusError(
                f"subscriber {args.name!r} is carried by {len(info.relays)} live relay(s) ({', '.join(info.relays)}), "
                "which would register it again when they restart; retire it once they stopped (after the rollout "
                "that removes it), or pass --force"
            )
        previous = await bus.subscribers.set_state(args.name, state)
    if args.json:
        out.json({"name": args.name, "state": str(state), "previous": None if previous is None else str(previous)})
        return EXIT_OK
    if previous == state:
        out.line(f"subscriber {args.name!r} was already {state}")
    else:
        out.line(f"subscriber {args.name!r}: {previous} -> {state}; " + _EFFECT[state].format(name=args.name))
    return EXIT_OK
