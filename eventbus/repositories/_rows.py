"""What the repositories share: JSON codecs for stored text, the cap on stored error text, and the reasons a
delivery is dead-lettered (the outbox's settle statement writes dead letters)."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import msgspec

from .._driver import redact_dsn

__all__ = ["MAX_ERROR_CHARS", "Reason", "cap_error", "headers_decoder", "json_encoder"]


class Reason(StrEnum):
    """Why a delivery ended in the dead-letter table."""

    DELIVERY_FAILED = "DeliveryFailed"
    DESERIALIZATION_FAILED = "DeserializationFailed"
    DUPLICATE_EVENT = "DuplicateEvent"
    HANDLER_MISSING = "HandlerMissing"
    HANDLER_TIMEOUT = "HandlerTimeout"


#: Stored error text is cut to this many characters (tracebacks can be long and can carry secrets).
MAX_ERROR_CHARS = 4096

json_encoder = msgspec.json.Encoder()
headers_decoder = msgspec.json.Decoder(dict[str, str])


def cap_error(text: str | None, redact: Callable[[str], str] | None = None) -> str | None:
    """Remove DSN passwords, redact (when a hook is set) and cut error text to :data:`MAX_ERROR_CHARS`."""
    if text is None:
        return None
    text = redact_dsn(text)
    if redact is not None:
        text = redact(text)
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 20] + " … [truncated]"
    return text
