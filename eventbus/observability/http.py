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
    task_status.started(bound)

    async def handle(stream: SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(10):
                    await _answer(stream, metrics, health)
            except Exception as exc:  # a client that went away or sent garbage: nothing to keep
                log.debug("metrics request failed: %s", exc)

    async with listener:
        await listener.serve(handle)


async def _answer(stream: SocketStream, metrics: Callable[[], bytes], health: Callable[[], Awaitable[_Health]]) -> None:
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        chunk = await stream.receive(4096)
        head += chunk
        if len(head) > _MAX_HEAD:
            break
    method, _, rest = head.partition(b"\n")[0].decode("latin-1").strip().partition(" ")
    path = rest.split(" ", 1)[0].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        await _send(stream, 405, b"only GET\n", "text/plain", method == "HEAD")
    elif path == "/metrics":
        await _send(stream, 200, metrics(), _PROMETHEUS, method == "HEAD")
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
