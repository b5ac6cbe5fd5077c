"""The boundary with the database driver: asyncpg's and the OS's exceptions become eventbus's own, and DSNs are
redacted before they reach any message.

Used by the bus and by every command of the CLI, so that a bad DSN, an unreachable server or a lost connection
reads the same wherever it happens, with the driver's exception kept as ``__cause__``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from .errors import ConfigurationError, DatabaseError, DatabaseUnavailable, EventBusError

__all__ = ["connect", "connecting", "redact_dsn", "translate"]

_HIDDEN = "***"
# user:password@ in a URL; the user part stays, so people recognise which account it was.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/?#@\s]*):[^@/?#\s]*@")
# password=... as a URL query parameter or a key/value DSN setting, quoted or not.
_PARAM_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&;]+)", re.IGNORECASE)

_FIX_DSN = "write it as postgresql://user:password@host:5432/database"
_FIX_REACH = (
    "Check that the server runs and the DSN (--dsn, EVENTBUS_DSN or EventBus(dsn)) is right, or leave both unset "
    "to use the embedded server"
)


def redact_dsn(text: str) -> str:
    """``text`` with every DSN password in it replaced by ``***``: in a URL's user part, in a ``password=``
    query parameter, or in a ``password=`` setting of a key/value DSN."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{_HIDDEN}@", text)
    return _PARAM_PASSWORD.sub(lambda m: f"{m['head']}{_HIDDEN}", text)


@contextmanager
def connecting(dsn: str) -> Iterator[None]:
    """Map what opening a connection (or a pool) on ``dsn`` raises to :class:`ConfigurationError` (the DSN cannot
    be used) or :class:`DatabaseUnavailable` (the server cannot be reached or refused the login)."""
    try:
        yield
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        raise ConfigurationError(
            f"the DSN {redact_dsn(dsn)!r} is not usable ({redact_dsn(str(exc))}); {_FIX_DSN}"
        ) from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {redact_dsn(str(exc))}. {_FIX_REACH}"
        ) from exc


async def connect(dsn: str, **options: Any) -> asyncpg.Connection:
    """One asyncpg connection, with the errors of :func:`connecting`."""
    with connecting(dsn):
        connection: asyncpg.Connection = await asyncpg.connect(dsn, **options)
        return connection


def translate(exc: BaseException) -> EventBusError | None:
    """The eventbus error standing for a driver exception raised after connecting, or None when ``exc`` is not a
    driver (or OS) error. The result's ``__cause__`` is ``exc``."""
    error: EventBusError
    if isinstance(exc, ConnectionError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
        error = DatabaseUnavailable(
            f"lost the connection to PostgreSQL ({redact_dsn(str(exc))}); check the server and retry"
        )
    elif isinstance(exc, asyncpg.PostgresError):
        error = DatabaseError(
            f"PostgreSQL refused the request: {redact_dsn(str(exc))} (SQLSTATE {exc.sqlstate})", sqlstate=exc.sqlstate
        )
    elif isinstance(exc, OSError):
        error = DatabaseUnavailable(f"{redact_dsn(str(exc))}; check the server and retry")
    else:
        return None
    error.__cause__ = exc
    return error
