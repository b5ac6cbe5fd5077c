"""No DSN password is ever printed: a sentinel password in each DSN form, through every command (text, --json and
--debug) and a relay's logs. The test servers use trust authentication, so the sentinel is never needed to
connect and never appears anywhere unless eventbus itself prints it.

(An unreachable server and a key/value DSN, which asyncpg cannot use, are in tests/test_driver.py.)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec
import pytest
from letters import dead_letter

from eventbus import EventBus, Reason
from eventbus.cli import main

pytestmark = pytest.mark.anyio

SENTINEL = "Sentinel-pw-7731qx"
ROOT = Path(__file__).parent.parent


def with_password(dsn: str, form: str) -> str:
    parts = urlsplit(dsn)
    if form == "url":
        user = parts.username or "postgres"
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"{user}:{SENTINEL}@{host}"))
    query = f"{parts.query}&password={SENTINEL}" if parts.query else f"password={SENTINEL}"
    return urlunsplit(parts._replace(query=query))


class Note(msgspec.Struct, frozen=True):
    n: int


@pytest.mark.parametrize("form", ["url", "query"])
async def test_no_command_prints_the_password(
    eventbus_dsn: str, eventbus_schema: str, form: str, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    dsn = with_password(eventbus_dsn, form)
    async with EventBus(dsn, schema=eventbus_schema, relay=False) as bus:
        letter_id, _ = await dead_letter(
            bus, reason=Reason.DELIVERY_FAILED, event_id=uuid.uuid4(), topic="notes", payload=b'{"n": 1}',
            subscriber="mailer", error=f"could not reach {dsn}",
        )  # fmt: skip
    caplog.set_level(logging.DEBUG)
    common = ["--dsn", dsn, "--schema", eventbus_schema]
    commands = [
        ["migrate"], ["status"], ["dlq", "list"], ["dlq", "show", str(letter_id)], ["dlq", "replay", "--dry-run"],
        ["dlq", "replay"], ["dlq", "purge", "--older-than", "1d"], ["outbox", "purge", "--older-than", "1d"],
        ["subscribers"], ["subscribers", "pause", "nobody"], ["dlq", "show", str(uuid.uuid4())],
    ]  # fmt: skip
    for command in commands:
        for extra in ([], ["--json"], ["--debug"]):
            code = await anyio.to_thread.run_sync(main, [*extra, *command, *common])
            captured = capsys.readouterr()
            shown = captured.out + captured.err + caplog.text
            assert SENTINEL not in shown, (command, extra, code)
            assert code in (0, 1), (command, extra, code, captured.err)
            caplog.clear()


@pytest.mark.subprocess
@pytest.mark.parametrize("form", ["url", "query"])
async def test_a_relay_logs_no_password(eventbus_dsn: str, eventbus_schema: str, form: str, tmp_path: Path) -> None:
    dsn = with_password(eventbus_dsn, form)
    app = tmp_path / "noted.py"
    app.write_text(
        "import msgspec\nfrom eventbus import EventBus\n\n"
        "class Note(msgspec.Struct, frozen=True):\n    n: int\n\n"
        "bus = EventBus(schema='unused')\n\n"
        "@bus.subscribe(name='noter', max_attempts=1)\nasync def note(event: Note) -> None:\n"
        "    raise RuntimeError('the handler fails, and its error is logged')\n"
    )
    async with EventBus(dsn, schema=eventbus_schema, relay=False) as bus, bus.transaction() as tx:
        await tx.publish(Note(1))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    log = tmp_path / "relay.log"
    argv = [sys.executable, "-m", "eventbus.cli", "--debug", "relay", "--app", "noted:bus", "--dsn", dsn,
            "--schema", eventbus_schema]  # fmt: skip
    child = _spawn(argv, env, log)
    try:
        async with EventBus(dsn, schema=eventbus_schema, relay=False) as bus:
            with anyio.fail_after(60):  # the event fails for good: a dead letter
                while not await bus.dead_letters.count() and child.poll() is None:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(lambda: child.wait(30))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    text = log.read_text()
    assert "relay" in text and child.returncode == 0, text
    assert SENTINEL not in text


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
