"""What the tests of tests/apps/brokered.py share: its event, and starting its relay or consumer process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec

__all__ = ["ROOT", "Order", "spawn"]

ROOT = Path(__file__).resolve().parent.parent


class Order(msgspec.Struct, frozen=True):
    """The topic tests/apps/brokered.py handles."""

    n: int


def spawn(command: str, url: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``eventbus relay`` or ``eventbus consume`` of tests/apps/brokered.py on NATS at ``url``, output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "eventbus.cli", command, "--app", "tests.apps.brokered:bus", "--nats", url],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
