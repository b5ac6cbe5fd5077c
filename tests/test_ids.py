"""UUIDv7 ids with a counter: strictly increasing in a process, and never ahead of the clock by more than a
millisecond, whatever the rate."""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import UTC, datetime

import pytest

from eventbus import id_time, max_id_for, min_id_for, new_id
from eventbus import ids as ids_module


def _ms(value: uuid.UUID) -> int:
    return value.int >> 80


def test_a_burst_of_a_million_ids_stays_with_the_clock() -> None:
    made = [new_id() for _ in range(1_000_000)]
    finished_ms = time.time_ns() // 1_000_000
    assert all(a < b for a, b in itertools.pairwise(made)), "ids must strictly increase"
    assert {made[0].version, made[-1].version} == {7}
    assert made[-1].variant == uuid.RFC_4122
    ahead_ms = _ms(made[-1]) - finished_ms
    assert ahead_ms < 1000, f"the burst ended {ahead_ms} ms ahead of the clock"
    assert ahead_ms <= 1


def test_a_steady_fifty_thousand_a_second_never_drifts() -> None:
    worst = 0
    last = new_id()
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # 50 ids in each millisecond for a second
        tick = time.monotonic()
        for _ in range(50):
            made = new_id()
            assert made > last
            last = made
            worst = max(worst, _ms(made) - time.time_ns() // 1_000_000)
        while time.monotonic() - tick < 0.001:
            pass
    assert worst <= 1, f"an id ran {worst} ms ahead of the clock"


def test_a_clock_that_steps_back_never_makes_a_smaller_id(monkeypatch: pytest.MonkeyPatch) -> None:
    before = new_id()
    monkeypatch.setattr(ids_module.time, "time_ns", lambda: (_ms(before) - 5_000) * 1_000_000)
    later = [new_id() for _ in range(1000)]
    assert before < later[0] and all(a < b for a, b in itertools.pairwise(later))
    assert {_ms(i) for i in later} <= {_ms(before), _ms(before) + 1}


def test_time_bounds_bracket_the_ids_of_a_moment() -> None:
    made = new_id()
    moment = id_time(made)
    assert min_id_for(moment) <= made <= max_id_for(moment)
    assert abs((datetime.now(UTC) - moment).total_seconds()) < 1
    with pytest.raises(ValueError, match="timezone-aware"):
        min_id_for(datetime(2026, 1, 1))
