"""One HTTP PUT at a time per worker thread, on blocking sockets, as boto3 sends its requests.

The relay's uploads used to go through aiohttp on the event loop. Every byte of a body then
crossed the loop thread: aiohttp's copy of the request head and body into one buffer, the
transport's copy of what the socket did not take at once, the ``send`` calls, and a TCP connect per
request (S3-compatible servers such as moto's answer ``Connection: close``). With 16 MiB WAL
segments and four uploads in flight that kept the loop busy most of the time, and an upload
waited for the loop to feed its socket. Here each request runs on a worker thread: ``sendall``
takes the caller's bytes without a copy and releases the GIL, the connect and the answer's
parsing overlap the other uploads, and the loop only signs requests and awaits their results.

Connections are kept for the next request when the server allows it (``http.client``'s own
keep-alive rules). `close` shuts down every socket in use, so a stopping service does not wait
for an upload's timeout.
"""

from __future__ import annotations

import asyncio
import http.client
import queue
import socket
import ssl
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

Answer = tuple[int, dict[str, str], bytes]
"""Status, headers (lowercase names) and body of an HTTP answer."""


class HttpPut:
    """PUT requests to one endpoint (scheme, host and port) from ``workers`` threads.

    Args:
        base_url: any URL of the endpoint; requests name their own path.
        workers: requests in flight at most (and connections kept).
        connect_timeout: seconds to connect (and, with TLS, to shake hands).
        read_timeout: seconds a send or a read may block.
        tls: the TLS context for ``https`` endpoints (ignored for ``http``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        workers: int,
        connect_timeout: float,
        read_timeout: float,
        tls: ssl.SSLContext,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) endpoint: {base_url}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._tls = tls
        self._idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue()
        self._busy: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="klio-put")

    async def put(self, path: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """Send ``PUT path`` with ``body`` and ``headers`` (as signed); return the answer.

        Raises:
            OSError: no answer (refused, reset, timed out, a malformed answer, or closed).
        """
        if self._closed:
            raise ConnectionAbortedError("the uploader is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._exchange, path, body, dict(headers))

    def close(self) -> None:
        """Stop: requests in flight fail at once, idle connections are closed."""
        with self._lock:
            self._closed = True
            busy = list(self._busy)
        for conn in busy:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- worker threads -------------------------------------------------------------------------

    def _exchange(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        conn, kept = self._checkout()
        try:
            return self._request(conn, path, body, headers)
        except ConnectionError:  # RemoteDisconnected, BrokenPipeError, ConnectionResetError
            if not kept:
                raise
        # A kept connection the server had closed meanwhile: once more, on a new one.
        conn, _ = self._checkout(fresh=True)
        return self._request(conn, path, body, headers)

    def _request(
        self, conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]
    ) -> Answer:
        reuse = False
        try:
            conn.request("PUT", path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            answer = {name.lower(): value for name, value in response.getheaders()}
            reuse = not response.will_close
            return response.status, answer, data
        except http.client.RemoteDisconnected:
            raise
        except http.client.HTTPException as exc:
            raise ConnectionError(f"malformed HTTP answer from {self._host}: {exc!r}") from exc
        finally:
            self._checkin(conn, reuse)

    def _checkout(self, *, fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """A connection for one request, and whether it served an earlier one."""
        with self._lock:
            if self._closed:
                raise ConnectionAbortedError("the uploader is closed")
            conn, kept = None, False
            if not fresh:
                try:
                    conn, kept = self._idle.get_nowait(), True
                except queue.Empty:
                    pass
            if conn is None:
                conn = self._connection()
            self._busy.add(conn)
        return conn, kept

    def _checkin(self, conn: http.client.HTTPConnection, reuse: bool) -> None:
        with self._lock:
            self._busy.discard(conn)
            if reuse and not self._closed:
                self._idle.put(conn)
                return
        conn.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            return _Https(
                self._host, self._port, self._connect_timeout, self._read_timeout, self._tls
            )
        return _Http(self._host, self._port, self._connect_timeout, self._read_timeout)


class _Http(http.client.HTTPConnection):
    """Connects within the connect timeout, then blocks at most the read timeout per call."""

    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self._read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()  # TCP_NODELAY included
        self.sock.settimeout(self._read_timeout)


class _Https(http.client.HTTPSConnection):
    """`_Http` with TLS (the handshake counts as connecting)."""

    def __init__(
        self,
        host: str,
        port: int,
        connect_timeout: float,
        read_timeout: float,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(host, port, timeout=connect_timeout, context=context)
        self._read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self._read_timeout)
