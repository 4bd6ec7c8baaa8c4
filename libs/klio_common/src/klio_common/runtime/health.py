"""The health endpoint: ``/livez``, ``/readyz`` (cached checks) and ``/metrics`` over HTTP/1.0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from klio_common.runtime import metrics

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
"""A readiness check: returns (ok, reason); it must be cheap and must not block."""

_REQUEST_TIMEOUT = 5.0
_MAX_HEADER = 16 * 1024
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Health:
    """Readiness state and the tiny HTTP server that reports it.

    Args:
        host: address to listen on.
        port: TCP port; 0 picks a free one (see `port` after `start`).
        cache_seconds: how long the result of the registered checks is reused.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 0, *, cache_seconds: float = 1.0) -> None:
        self._host = host
        self._port = port
        self._cache_seconds = cache_seconds
        self._checks: dict[str, Check] = {}
        self._pushed: dict[str, tuple[bool, str]] = {}
        self._cached: tuple[float, list[str]] | None = None
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when 0 was asked)."""
        if self._server is not None and self._server.sockets:
            port: int = self._server.sockets[0].getsockname()[1]
            return port
        return self._port

    def add_check(self, name: str, check: Check) -> None:
        """Register a pull-style readiness check, evaluated at most once per cache period."""
        self._checks[name] = check
        self._cached = None

    def set_ready(self, name: str, ok: bool, reason: str = "") -> None:
        """Record a push-style condition, e.g. ``set_ready("stream", False, "no primary")``."""
        self._pushed[name] = (ok, reason)

    def failures(self) -> list[str]:
        """Return ``"name: reason"`` for every failing condition; empty when ready."""
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] >= self._cache_seconds:
            failing = []
            for name, check in self._checks.items():
                try:
                    ok, reason = check()
                except Exception as exc:  # a broken check means not ready, not a broken server
                    ok, reason = False, f"check failed: {exc}"
                if not ok:
                    failing.append(f"{name}: {reason}")
            self._cached = (now, failing)
        pushed = [f"{n}: {reason}" for n, (ok, reason) in self._pushed.items() if not ok]
        return self._cached[1] + pushed

    async def start(self) -> None:
        """Listen for probes.

        Raises:
            OSError: the address is not available (port in use, bad host).
        """
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("health endpoint listening", extra={"host": self._host, "port": self.port})

    async def close(self) -> None:
        """Stop listening and wait for open requests to end."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), _REQUEST_TIMEOUT)
            self._server = None

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/livez":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            failing = self.failures()
            if failing:
                body = "not ready\n" + "".join(f"{line}\n" for line in failing)
                return 503, "text/plain; charset=utf-8", body.encode()
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/metrics":
            return 200, metrics.CONTENT_TYPE, metrics.exposition()
        return 404, "text/plain; charset=utf-8", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            if len(head) > _MAX_HEADER:
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                return
            method, path = parts[0], parts[1]
            status, content_type, body = self._route(method, path)
            header = (
                f"HTTP/1.0 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(header if method == "HEAD" else header + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a probe that hung up or sent garbage gets no answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
