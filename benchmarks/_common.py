"""What every benchmark shares: settings, scratch schemas, percentiles, result rows and machine info."""

from __future__ import annotations

import math
import os
import platform
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg

from eventbus import migrate
from eventbus.sql import quote_schema

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Settings:
    dsn: str
    quick: bool


@dataclass(slots=True)
class Row:
    """One printed figure beside the baseline it is compared with."""

    benchmark: str
    case: str
    metric: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None
    note: str = ""

    @classmethod
    def compare(
        cls, benchmark: str, case: str, metric: str, value: float | None, unit: str, baseline: float | None,
        baseline_label: str, note: str = "",
    ) -> Row:  # fmt: skip
        """A row whose ratio is ``value / baseline`` (None when either is missing or the baseline is zero)."""
        ratio = None
        if value is not None and baseline not in (None, 0) and math.isfinite(value):
            assert baseline is not None
            ratio = value / baseline
        return cls(benchmark, case, metric, value, unit, baseline, baseline_label, ratio, note)


@dataclass(slots=True)
class Outcome:
    """What one benchmark returns: printed rows plus everything else worth keeping in the JSON file."""

    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of already sorted values, linearly interpolated; None when empty."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """Count, mean, p50, p90, p99, p99.9 and max of durations given in seconds, in milliseconds."""
    values = sorted(s * 1000.0 for s in seconds)
    return {
        "count": len(values),
        "mean": sum(values) / len(values) if values else None,
        "min": values[0] if values else None,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "p99.9": percentile(values, 99.9),
        "max": values[-1] if values else None,
    }


def schema_name(benchmark: str) -> str:
    return f"bench_{benchmark}_{secrets.token_hex(4)}"


@asynccontextmanager
async def scratch_schema(dsn: str, benchmark: str) -> AsyncIterator[str]:
    """A fresh schema migrated with :func:`eventbus.migrate`, dropped afterwards even on error or cancellation."""
    schema = schema_name(benchmark)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, schema)
    finally:
        await conn.close()
    try:
        yield schema
    finally:
        await drop_schema(dsn, schema)


async def drop_schema(dsn: str, schema: str) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(60):
        try:
            conn = await asyncpg.connect(dsn)
        except Exception as exc:
            print(f"  warning: could not connect to drop schema {schema}: {exc}", file=sys.stderr)
            return
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {quote_schema(schema)} CASCADE")
        except Exception as exc:
            print(f"  warning: could not drop schema {schema}: {exc}", file=sys.stderr)
        finally:
            await conn.close()


async def vacuum_analyze(dsn: str, schema: str, table: str = "eventbus_outbox") -> None:
    """Fresh statistics and visibility map after a bulk fill, so every variant starts from the same state."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"VACUUM (ANALYZE) {quote_schema(schema)}.{table}")
    finally:
        await conn.close()


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


async def machine_info(dsn: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "asyncpg": asyncpg.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None,
        "postgres": None,
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        info["git_dirty"] = bool(status)
    try:
        import eventbus

        info["eventbus"] = eventbus.__version__
    except Exception:  # pragma: no cover - the package is importable whenever the benchmarks run
        pass
    try:
        conn = await asyncpg.connect(dsn)
        try:
            info["postgres"] = await conn.fetchval("select version()")
            info["postgres_settings"] = {
                name: await conn.fetchval(f"show {name}")
                for name in ("synchronous_commit", "fsync", "shared_buffers", "max_connections")
            }
        finally:
            await conn.close()
    except Exception as exc:
        info["postgres"] = f"unavailable: {exc}"
    with suppress(OSError):
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def redact_dsn(dsn: str) -> str:
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}@{host}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_table(rows: Sequence[Row]) -> str:
    headers = ["benchmark", "case", "metric", "value", "baseline", "ratio", "note"]
    cells = [
        [
            r.benchmark,
            r.case,
            r.metric,
            f"{_fmt(r.value)} {r.unit}".strip(),
            f"{_fmt(r.baseline)} ({r.baseline_label})" if r.baseline is not None else "-",
            f"{r.ratio:.2f}x" if r.ratio is not None else "-",
            r.note,
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells)
    return "\n".join(lines)


def row_dicts(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
