"""An application whose plain ``def`` handler hangs: `eventbus relay --app tests.apps.hung_def:bus` must still exit
on SIGTERM (tests/test_threads.py)."""

from __future__ import annotations

import os
import time

import msgspec

from eventbus import EventBus, RelayConfig


class Stuck(msgspec.Struct, frozen=True):
    n: int


bus = EventBus(
    os.environ["HUNG_DSN"], schema=os.environ["HUNG_SCHEMA"], stop_timeout=0.5,
    relay_config=RelayConfig(poll_interval=0.05),
)  # fmt: skip


@bus.subscribe(name="stuck", timeout=0.3, max_attempts=10, backoff=0.01)
def hang(event: Stuck) -> None:
    print(f"handling {event.n}", flush=True)
    time.sleep(3600)
