"""Every code block of README.md and docs/ that claims to run (a ``<!-- runs -->`` line before it) runs as
written: in a fresh process, in an empty folder, against a database of its own (``EVENTBUS_DSN``)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
from runnable import ROOT, blocks, documents

RUNNABLE = [(path, n, code) for path in documents() for n, code in enumerate(blocks(path), 1)]


def test_readme_has_a_runnable_first_example() -> None:
    assert blocks(ROOT / "README.md"), "README.md's first example is no longer marked <!-- runs -->"


@pytest.fixture
def database(eventbus_dsn: str) -> Iterator[str]:
    """A database of its own on the tests' server: what the examples make (schemas, tables) goes with it."""
    name = f"docs_{uuid.uuid4().hex[:10]}"

    async def run(statement: str) -> None:
        conn = await asyncpg.connect(eventbus_dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    anyio.run(run, f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(eventbus_dsn)._replace(path=f"/{name}"))
    finally:
        anyio.run(run, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    ("path", "n", "code"), RUNNABLE, ids=[f"{p.relative_to(ROOT)}#{n}" for p, n, _ in RUNNABLE]
)
def test_the_block_runs(path: Path, n: int, code: str, database: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "EVENTBUS_DSN": database}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{path.name} block {n} failed:\n{done.stdout}\n{done.stderr}"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """``mkdocs build --strict``: every page in the nav, every link between pages and every API reference
    resolves (a warning fails the build)."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "index.html").exists()
