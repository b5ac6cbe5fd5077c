"""Logs, through the standard library's ``logging`` under the logger ``eventbus``.

- WARNING ``eventbus.handlers`` for each failed attempt that will be retried, ERROR (with the traceback) for each
  delivery that is dead-lettered; never a record per successful event.
- INFO ``eventbus.relay`` for a relay's start and stop, partitions taken and given up, and reconnects.

The fields travel as record attributes (``extra=``), so JSON formatters pick them up: ``subscriber``, ``topic``,
``event_id``, ``key``, ``attempt``, ``max_attempts``, ``error_type``, ``error``, ``retry_in`` (seconds),
``reason``, ``tenant``, ``trace_id`` (when there is one) and ``traceback`` (dead letters). Error text and
tracebacks went through DSN redaction and the bus's ``redact`` hook before they get here.

:class:`JsonFormatter` writes one JSON object per record (``eventbus relay --log-format json``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback as tb
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from .tracing import trace_id_of

if TYPE_CHECKING:
    from ..events import Envelope

__all__ = ["JsonFormatter", "attempt_failed", "configure", "dead_lettered", "emit", "format_traceback"]

_handlers = logging.getLogger("eventbus.handlers")

#: Stored and logged tracebacks are cut to this many characters, keeping their end (where the error is).
MAX_TRACEBACK_CHARS = 8192

#: The attributes every LogRecord has; the others came through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

# A field JSON cannot hold (a UUID is fine) is written as its str().
_encoder = msgspec.json.Encoder(enc_hook=str)

def format_traceback(exc: BaseException, redact: Callable[[str], str] | None = None) -> str:
    """``exc``'s traceback as text, through DSN redaction and ``redact`` (a ``str -> str`` hook), cut to
    :data:`MAX_TRACEBACK_CHARS` keeping its end."""
    from .._driver import redact_dsn  # the boundary module imports nothing of this package

    try:
        text = "".join(tb.format_exception(exc))
    except Exception:  # an exception whose message cannot be read
        text = f"{type(exc).__qualname__} (its traceback could not be formatted)"
    text = redact_dsn(text)
    if redact is not None:
        text = redact(text)
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "[… truncated] " + text[-(MAX_TRACEBACK_CHARS - 14) :]
    return text


def emit(
    logger: logging.Logger, level: int, msg: str, *args: Any, fields: dict[str, Any], exc_text: str | None = None
) -> None:
    """Log a record with ``fields`` as its attributes (what ``extra=`` does) and ``exc_text`` as its formatted
    traceback. It never raises: a filter, handler or record factory of the application that fails (one that sets
    a field of the same name already, say) costs the record, not the delivery that logs it."""
    try:
        if not logger.isEnabledFor(level):
            return
        record = logger.makeRecord(logger.name, level, __file__, 0, msg, args, None)
        for name, value in fields.items():
            setattr(record, name, value)
        # The formatted text, never the exception itself: a formatter would print it unredacted.
        record.exc_text = exc_text
        logger.handle(record)
    except Exception:
        with contextlib.suppress(Exception):
            logging.getLogger("eventbus").debug("a log record could not be written", exc_info=True)


def _fields(envelope: Envelope, subscriber: str | None, trace_id: str | None, tenant: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "subscriber": subscriber, "topic": envelope.topic, "event_id": str(envelope.event_id), "key": envelope.key,
    }  # fmt: skip
    tenant = envelope.tenant if tenant is None else tenant
    if tenant:
        fields["tenant"] = tenant
    trace_id = trace_id or trace_id_of(envelope.headers)
    if trace_id:
        fields["trace_id"] = trace_id
    return fields


def attempt_failed(
    envelope: Envelope,
    subscriber: str,
    attempt: int,
    max_attempts: int,
    error_type: str,
    error: str | None,
    retry_in: float,
    *,
    trace_id: str | None = None,
) -> None:
    """A WARNING for a failed attempt that will be retried (``error`` redacted already)."""
    if not _handlers.isEnabledFor(logging.WARNING):
        return
    fields = _fields(envelope, subscriber, trace_id, None)
    fields.update(attempt=attempt, max_attempts=max_attempts, error_type=error_type, error=error,
                  retry_in=round(retry_in, 3))  # fmt: skip
    emit(
        _handlers, logging.WARNING, "subscriber %s: attempt %d of %d failed on %s event %s%s: %s; retrying in %.1f s",
        subscriber, attempt, max_attempts, envelope.topic, envelope.event_id,
        f" (key {envelope.key!r})" if envelope.key is not None else "", error, retry_in, fields=fields,
    )  # fmt: skip


def dead_lettered(
    envelope: Envelope,
    subscriber: str | None,
    reason: str,
    error_type: str | None,
    error: str | None,
    attempts: int,
    *,
    traceback: str | None = None,
    trace_id: str | None = None,
    tenant: str | None = None,
) -> None:
    """An ERROR for a delivery that goes to the dead-letter table, with its (redacted) traceback when it has one:
    text formatters print it after the message, :class:`JsonFormatter` as ``exception``."""
    if not _handlers.isEnabledFor(logging.ERROR):
        return
    fields = _fields(envelope, subscriber, trace_id, tenant)
    fields.update(reason=str(reason), attempt=attempts, error_type=error_type, error=error)
    emit(
        _handlers, logging.ERROR, "subscriber %s: %s event %s%s dead-lettered as %s after %d attempts: %s",
        subscriber or "(none)", envelope.topic, envelope.event_id,
        f" (key {envelope.key!r})" if envelope.key is not None else "", reason, attempts, error,
        fields=fields, exc_text=traceback,
    )  # fmt: skip


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the fields given
    through ``extra=``, and ``exception`` when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        return _encoder.encode(document).decode()


def configure(level: str | int, form: str = "text") -> None:
    """Log to standard error at ``level`` as ``text`` (one line per record, fields after the message) or
    ``json`` (:class:`JsonFormatter`), replacing the root logger's handlers."""
    handler = logging.StreamHandler(sys.stderr)
    if form == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
