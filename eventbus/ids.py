"""UUIDv7 identifiers: time-ordered, so the primary key doubles as a time index (BRIN) and a retention cursor.

Ids are made as RFC 9562 describes with a dedicated counter (its "method 1"): 48 bits of Unix milliseconds,
then a 26-bit counter (the 12 ``rand_a`` bits and the top 14 bits of ``rand_b``), then 48 random bits. Within
one millisecond the counter counts up from a random start below 2**25, so one millisecond has room for at least
2**25 ids, far more than a process can make; only if it ever ran out would the timestamp move on a millisecond
early. A clock that steps back never makes an id smaller than the last one. So ids are strictly increasing in
one process, and their timestamps stay within a millisecond of the clock at any rate.

Across processes, order follows the hosts' clocks: two producers' ids interleave by their clocks' readings,
which is publish order only as far as the clocks agree.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from datetime import UTC, datetime

__all__ = ["id_time", "max_id_for", "min_id_for", "new_id"]

_RANDOM_BITS = 80
_RANDOM_MASK = (1 << _RANDOM_BITS) - 1
_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62
_COUNTER_BITS = 26
_COUNTER_LIMIT = 1 << _COUNTER_BITS
_COUNTER_START = 1 << (_COUNTER_BITS - 1)  # a fresh millisecond starts below this: half the room stays free
_TAIL_BITS = 48

_lock = threading.Lock()
_last_ms = 0
_counter = 0
_random = random.Random()  # ids need uniqueness, not secrecy; os.urandom per id would cost a system call


def new_id() -> uuid.UUID:
    """Return a new UUIDv7, greater than every id this process returned before."""
    global _last_ms, _counter
    now_ms = time.time_ns() // 1_000_000
    with _lock:
        if now_ms > _last_ms:
            _last_ms, _counter = now_ms, _random.getrandbits(_COUNTER_BITS - 1)
        else:  # the same millisecond, or the clock stepped back: count on from the last id
            _counter += 1
            if _counter == _COUNTER_LIMIT:
                _last_ms, _counter = _last_ms + 1, _random.getrandbits(_COUNTER_BITS - 1)
        ms, counter = _last_ms, _counter
    return uuid.UUID(
        int=(ms << 80)
        | _VERSION_7
        | ((counter >> 14) << 64)
        | _VARIANT
        | ((counter & 0x3FFF) << _TAIL_BITS)
        | _random.getrandbits(_TAIL_BITS)
    )


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
