"""The boundary with the database driver: asyncpg's and the OS's exceptions become eventbus's own, and DSNs are
redacted before they reach any message.

Used by the bus and by every command of the CLI, so that a bad DSN, an unreachable server or a lost connection
reads the same wherever it happens, with the driver's exception kept as ``__cause__``.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg

from .errors import ConfigurationError, DatabaseError, DatabaseUnavailable, EventBusError

__all__ = ["connect", "connecting", "redact_dsn", "redact_secrets", "translate"]

_HIDDEN = "***"
# A URL: scheme://, then everything up to whitespace or a quote. Its user part is what stands before the last "@".
_URL = re.compile(r"""(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<rest>[^\s'"]+)""")
# password=... or sslpassword=... as a URL query parameter or a key/value DSN setting, quoted or not.
_PARAM_PASSWORD = re.compile(r"(?P<head>\b(?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s&;]+)", re.IGNORECASE)
# What splits a password a parser misread into the pieces it may quote back.
_PIECES = re.compile(r"[/@:?#&=\s]+")

_FIX_DSN = "write it as postgresql://user:password@host:5432/database"
_FIX_REACH = (
    "Check that the server runs and the DSN (--dsn, EVENTBUS_DSN or EventBus(dsn)) is right, or leave both unset "
    "to use the embedded server"
)


def redact_dsn(text: str) -> str:
    """``text`` with every DSN password in it replaced by ``***``: in a URL's user part (whatever the password
    holds), in a ``password=`` or ``sslpassword=`` query parameter, or in such a setting of a key/value DSN."""
    return _PARAM_PASSWORD.sub(lambda m: f"{m['head']}{_HIDDEN}", _URL.sub(_redact_url, text))


def _redact_url(match: re.Match[str]) -> str:
    rest = match["rest"]
    if "@" not in rest:
        return match[0]
    credentials, host = rest.rsplit("@", 1)
    if ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":" + _HIDDEN
    return f"{match['scheme']}{credentials}@{host}"


def _passwords(dsn: str) -> list[str]:
    """The passwords in ``dsn``, and the pieces of them (of 3 characters or more) a parser may quote back."""
    found = [m[0].split("=", 1)[1].strip().strip("'") for m in _PARAM_PASSWORD.finditer(dsn)]
    url = _URL.search(dsn)
    if url is not None and "@" in url["rest"]:
        credentials = url["rest"].rsplit("@", 1)[0]
        if ":" in credentials:
            found.append(credentials.split(":", 1)[1])
    pieces = [piece for secret in found for piece in _PIECES.split(secret)]
    return sorted({s for s in [*found, *pieces] if len(s) >= 3}, key=len, reverse=True)


def redact_secrets(text: str, dsn: str) -> str:
    """``text`` (a driver's message, a traceback) without ``dsn``'s password, whole or in pieces, nor any DSN
    password of its own."""
    text = redact_dsn(text)
    for secret in _passwords(dsn):
        text = text.replace(secret, _HIDDEN)
    return text


@contextmanager
def connecting(dsn: str) -> Iterator[None]:
    """Map what opening a connection (or a pool) on ``dsn`` raises to :class:`ConfigurationError` (the DSN cannot
    be used) or :class:`DatabaseUnavailable` (the server cannot be reached or refused the login)."""
    try:
        yield
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        raise ConfigurationError(
            f"the DSN {redact_dsn(dsn)!r} is not usable ({redact_secrets(str(exc), dsn)}); {_FIX_DSN}"
        ) from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(
            f"cannot connect to PostgreSQL at {redact_dsn(dsn)}: {redact_secrets(str(exc), dsn)}. {_FIX_REACH}"
        ) from exc


async def connect(dsn: str, **options: Any) -> asyncpg.Connection:
    """One asyncpg connection, with the errors of :func:`connecting`."""
    with connecting(dsn):
        connection: asyncpg.Connection = await asyncpg.connect(dsn, **options)
        return connection


def translate(exc: BaseException) -> EventBusError | None:
    """The eventbus error standing for a driver exception raised after connecting, or None when ``exc`` is not a
    driver error nor a lost connection. The result's ``__cause__`` is ``exc``."""
    error: EventBusError
    # InternalClientError: what asyncpg raises for a statement sent as the server's termination notice arrives.
    lost = ConnectionError | socket.gaierror | asyncpg.PostgresConnectionError | asyncpg.InterfaceError
    # SQLSTATE classes 08 (connection exception) and 57 (operator intervention: shutting down, starting up,
    # terminated by an administrator) say the server went away, not that it refused the statement; but 57014 is
    # a statement cancelled (a statement_timeout).
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    server_gone = isinstance(exc, asyncpg.PostgresError) and sqlstate[:2] in ("08", "57") and sqlstate != "57014"
    if isinstance(exc, lost | asyncpg.InternalClientError) or server_gone:
        error = DatabaseUnavailable(
            f"lost the connection to PostgreSQL ({redact_dsn(str(exc))}); check the server and retry"
        )
    elif isinstance(exc, asyncpg.PostgresError):
        error = DatabaseError(
            f"PostgreSQL refused the request: {redact_dsn(str(exc))} (SQLSTATE {exc.sqlstate})", sqlstate=exc.sqlstate
        )
    else:
        return None
    error.__cause__ = exc
    return error
