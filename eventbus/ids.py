"""UUIDv7 identifiers: time-ordered, so the primary key doubles as a time index (BRIN) and a retention cursor.

Ids come from :func:`uuid6.uuid7`, which is monotonic within a process: when several ids fall in the same
millisecond, the timestamp field is advanced by one millisecond per id, so a burst of more than a thousand ids
per millisecond runs ahead of the wall clock by that much. Time bounds derived from ids are therefore an
upper bound on age, which errs on the safe side for retention (rows look newer, never older).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import uuid6

__all__ = ["id_time", "max_id_for", "min_id_for", "new_id"]

_RANDOM_BITS = 80
_RANDOM_MASK = (1 << _RANDOM_BITS) - 1
_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62


def new_id() -> uuid.UUID:
    """Return a new UUIDv7, greater than every id this process returned before."""
    return uuid6.uuid7()


def _millis(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("pass a timezone-aware datetime (for example datetime.now(UTC)), not a naive one")
    return int(moment.timestamp() * 1000)


def min_id_for(moment: datetime) -> uuid.UUID:
    """The smallest UUIDv7 whose timestamp is ``moment`` (to the millisecond): ``id >= min_id_for(t)``."""
    return uuid.UUID(int=(_millis(moment) << _RANDOM_BITS) | _VERSION_7 | _VARIANT)


def max_id_for(moment: datetime) -> uuid.UUID:
    """The largest UUIDv7 whose timestamp is ``moment`` (to the millisecond): ``id <= max_id_for(t)``."""
    return uuid.UUID(int=(_millis(moment) << _RANDOM_BITS) | _RANDOM_MASK)


def id_time(value: uuid.UUID) -> datetime:
    """The creation time encoded in a UUIDv7."""
    if value.version != 7:
        raise ValueError(f"{value} is a version {value.version} UUID; only UUIDv7 carries a timestamp")
    return datetime.fromtimestamp((value.int >> _RANDOM_BITS) / 1000, tz=UTC)
