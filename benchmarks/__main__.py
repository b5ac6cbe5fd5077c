"""``python -m benchmarks run [--quick] [--dsn DSN] [--only NAME,...] [--json PATH] [--profile]``.

Without ``--dsn`` the benchmarks use ``EVENTBUS_DSN``, else eventbus's embedded PostgreSQL server.
``clean`` drops leftover ``bench_*`` schemas (after a run was killed with SIGKILL).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import anyio
import anyio.to_thread
import asyncpg

from . import burndown, fanout, isolation, latency, nats, offer, peer, purge, replay, scale, telemetry, tenants
from ._common import Outcome, Row, Settings, format_table, machine_info, redact_dsn, row_dicts

Benchmark = Callable[[Settings], Awaitable[Outcome]]

#: name -> (run, time budget in seconds for quick, for full). A benchmark over budget is cancelled and reported.
BENCHMARKS: dict[str, tuple[Benchmark, float, float]] = {
    latency.NAME: (latency.run, 60, 240),
    offer.NAME: (offer.run, 30, 150),
    burndown.NAME: (burndown.run, 75, 900),
    fanout.NAME: (fanout.run, 45, 300),
    purge.NAME: (purge.run, 60, 300),
    peer.NAME: (peer.run, 90, 900),
    isolation.NAME: (isolation.run, 45, 120),
    telemetry.NAME: (telemetry.run, 240, 600),
    nats.NAME: (nats.run, 120, 400),
    tenants.NAME: (tenants.run, 120, 400),
    scale.NAME: (scale.run, 240, 7200),
    replay.NAME: (replay.run, 300, 900),
}

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


async def resolve_dsn(dsn: str | None) -> str:
    if dsn:
        return dsn
    if os.environ.get("EVENTBUS_DSN"):
        return os.environ["EVENTBUS_DSN"]
    from eventbus._embedded import embedded_dsn

    return await embedded_dsn()


async def _run_one(name: str, bench: Benchmark, budget: float, settings: Settings, profile_dir: Path | None) -> Outcome:
    profiler = cProfile.Profile() if profile_dir is not None else None
    started = perf_counter()
    outcome: Outcome
    try:
        with anyio.fail_after(budget):
            if profiler is not None:
                profiler.enable()
            try:
                outcome = await bench(settings)
            finally:
                if profiler is not None:
                    profiler.disable()
    except TimeoutError:
        outcome = Outcome(error=f"cancelled after its budget of {budget:g} s")
    except Exception as exc:
        traceback.print_exc()
        outcome = Outcome(error=f"{type(exc).__name__}: {exc}")
    outcome.seconds = perf_counter() - started
    if outcome.error:
        outcome.rows.append(Row(name, "error", "-", None, "", note=outcome.error))
    if profiler is not None and profile_dir is not None:
        await anyio.to_thread.run_sync(_dump_profile, profiler, profile_dir, name)
    return outcome


def _dump_profile(profiler: cProfile.Profile, profile_dir: Path, name: str) -> None:
    profile_dir.mkdir(parents=True, exist_ok=True)
    path = profile_dir / f"{name}.prof"
    profiler.dump_stats(path)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(f"  profile written to {path}; top functions by own time:")
    print("\n".join("    " + line for line in text.getvalue().splitlines()[:45]))


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


async def run(args: argparse.Namespace) -> int:
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
    dsn = await resolve_dsn(args.dsn)
    settings = Settings(dsn=dsn, quick=args.quick)
    machine = await machine_info(dsn)
    print(
        f"eventbus benchmarks ({'quick' if args.quick else 'full'}) on {redact_dsn(dsn)}\n"
        f"  {machine['nproc']} CPUs, {machine.get('postgres')}\n"
        f"  commit {machine.get('git_commit')}{' (dirty tree)' if machine.get('git_dirty') else ''}",
        flush=True,
    )
    profile_dir = Path(args.json).parent / "profiles" if args.profile else None
    results: dict[str, Any] = {}
    rows: list[Row] = []
    started = perf_counter()
    for name in names:
        bench, quick_budget, full_budget = BENCHMARKS[name]
        print(f"\n== {name}", flush=True)
        outcome = await _run_one(name, bench, quick_budget if args.quick else full_budget, settings, profile_dir)
        print(f"  ({outcome.seconds:.1f} s)", flush=True)
        rows.extend(outcome.rows)
        results[name] = {
            "seconds": outcome.seconds,
            "error": outcome.error,
            "rows": row_dicts(outcome.rows),
            "details": outcome.details,
        }
    total = perf_counter() - started
    print()
    print(format_table(rows))
    print(f"\ntotal {total:.1f} s. Ratios are ours / baseline; every baseline ran in this same process and run.")
    report = {
        "mode": "quick" if args.quick else "full",
        "dsn": redact_dsn(dsn),
        "machine": machine,
        "total_seconds": total,
        "benchmarks": results,
    }
    path = Path(args.json)
    await anyio.to_thread.run_sync(_write_json, path, report)
    print(f"results written to {path}")
    return 1 if any(r["error"] for r in results.values()) else 0


async def clean(args: argparse.Namespace) -> int:
    dsn = await resolve_dsn(args.dsn)
    conn = await asyncpg.connect(dsn)
    try:
        schemas = [
            r["nspname"]
            for r in await conn.fetch(r"SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench\_%' ORDER BY 1")
        ]
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            print(f"dropped {schema}")
    finally:
        await conn.close()
    if not schemas:
        print("no bench_* schemas left over")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run benchmarks and print figures beside their baselines")
    run_parser.add_argument("--quick", action="store_true", help="short runs (under 2 minutes in total)")
    run_parser.add_argument("--dsn", help="PostgreSQL URL (default: EVENTBUS_DSN, else the embedded server)")
    run_parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    run_parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write results (default: %(default)s)")
    run_parser.add_argument(
        "--profile", action="store_true", help="run each benchmark under cProfile; write .prof files beside --json"
    )
    clean_parser = commands.add_parser("clean", help="drop bench_* schemas left by killed runs (only when idle)")
    clean_parser.add_argument("--dsn")
    args = parser.parse_args(argv)
    command = run if args.command == "run" else clean
    return anyio.run(command, args)


if __name__ == "__main__":
    sys.exit(main())
