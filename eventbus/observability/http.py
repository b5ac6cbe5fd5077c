"""``/metrics``, ``/healthz`` and ``/readyz`` over HTTP, for ``EventBus(metrics_port=...)`` and
``eventbus relay --metrics-port``.

A small HTTP/1.1 server on anyio's TCP listener, written here rather than taken from a web framework: it answers
three GET paths, one request per connection, and lives in the bus's task group, so the readiness it reports is
the relay's own state. ``/metrics`` is the Prometheus text exposition; ``/healthz`` and ``/readyz`` answer 200
or 503 with a JSON document of their checks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import msgspec
from anyio.abc import SocketStream, TaskStatus

from ..errors import ConfigurationError

__all__ = ["serve_http"]

log = logging.getLogger("eventbus.http")

_MAX_HEAD = 8192
#: Requests answered at once; more wait in the listen backlog. A request's head must arrive within
#: :data:`_HEAD_TIMEOUT` seconds.
_CONCURRENT = 16
_HEAD_TIMEOUT = 2.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}  # fmt: skip
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class _Health(Protocol):
    alive: bool
    ready: bool
    checks: dict[str, str]


async def serve_http(
    host: str,
    port: int,
    metrics: Callable[[], bytes],
    health: Callable[[], Awaitable[_Health]],
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status`` gets the address bound (the port picked, for port 0)."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); pick another metrics port "
            "(--metrics-port or EventBus(metrics_port=...))"
        ) from exc
    address: Any = listener.extra(anyio.abc.SocketAttribute.local_address)
    bound = (str(address[0]), int(address[1]))
    log.info("serving /metrics, /healthz and /readyz on http://%s:%d", *bound)
    slots = anyio.Semaphore(_CONCURRENT)

    async def handle(stream: SocketStream) -> None:
        try:
            async with stream:
                await _answer(stream, metrics, health)
        except Exception as exc:  # a client that went away or sent garbage: nothing to keep
            log.debug("metrics request failed: %s", exc)
        finally:
            slots.release()

    async def accept(one: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup) -> None:
        # Not anyio's serve(): an accept() that fails (out of file descriptors, say) must not end the bus.
        while True:
            await slots.acquire()
            try:
                stream = await one.accept()
            except OSError as exc:
                slots.release()
                log.warning("metrics server: accepting a connection failed (%s); trying again in 0.5 s", exc)
                await anyio.sleep(0.5)
                continue
            tg.start_soon(handle, stream)

    async with listener, anyio.create_task_group() as tg:
        for one in listener.listeners:
            assert isinstance(one, anyio.abc.SocketListener), "a TCP listener accepts sockets"
            tg.start_soon(accept, one, tg)
        task_status.started(bound)


async def _answer(stream: SocketStream, metrics: Callable[[], bytes], health: Callable[[], Awaitable[_Health]]) -> None:
    head = b""
    with anyio.fail_after(_HEAD_TIMEOUT):
        while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) <= _MAX_HEAD:
            head += await stream.receive(4096)
    method, _, rest = head.partition(b"\n")[0].decode("latin-1").strip().partition(" ")
    path = rest.split(" ", 1)[0].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        await _send(stream, 405, b"only GET\n", "text/plain", method == "HEAD")
    elif path == "/metrics":
        try:
            body = metrics()
        except Exception as exc:
            log.warning("metrics server: /metrics failed (%s: %s)", type(exc).__name__, exc)
            await _send(stream, 500, b"collecting the metrics failed; see the process's log\n", "text/plain",
                        method == "HEAD")  # fmt: skip
            return
        await _send(stream, 200, body, _PROMETHEUS, method == "HEAD")
    elif path in ("/healthz", "/readyz", "/livez"):
        found = await health()
        ok = found.ready if path == "/readyz" else found.alive
        document = {"status": "ok" if ok else "failing", "checks": found.checks}
        await _send(stream, 200 if ok else 503, msgspec.json.encode(document) + b"\n", "application/json",
                    method == "HEAD")  # fmt: skip
    else:
        await _send(stream, 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain", method == "HEAD")


async def _send(stream: SocketStream, status: int, body: bytes, content_type: str, head_only: bool) -> None:
    header = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    await stream.send(header if head_only else header + body)
