"""HttpPut's connection handling against a local HTTP/1.1 server (keep-alive, stale, close)."""

from __future__ import annotations

import asyncio
import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from klio_common.storage.httpput import HttpPut
from tests.fixtures.tls import self_signed


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.connections = 0
        self.bodies: list[tuple[str, bytes, str]] = []
        self.close_after_answer = False
        self.hold = threading.Event()  # set: answers wait until released
        self.release = threading.Event()
        self.received = threading.Event()
        self.handlers: list[_Handler] = []


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1
        self.server.handlers.append(self)

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append((self.path, body, self.headers.get("X-Test", "")))
        self.server.received.set()
        if self.server.hold.is_set():
            self.server.release.wait(10)
        self.send_response(200)
        self.send_header("ETag", '"e"')
        self.send_header("Content-Length", "0")
        if self.server.close_after_answer:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        srv.shutdown()
        srv.server_close()


_TLS = ssl.create_default_context()


def _client(server: _Server) -> HttpPut:
    host, port = server.server_address[:2]
    return HttpPut(
        f"http://{host!s}:{port}/bucket/",
        workers=2,
        connect_timeout=2.0,
        read_timeout=5.0,
        tls=_TLS,
    )


async def test_a_kept_connection_carries_the_next_request(server: _Server) -> None:
    client = _client(server)
    try:
        for i in range(3):
            status, headers, body = await client.put(
                f"/bucket/k{i}", bytes([i]) * 100_000, {"X-Test": str(i)}
            )
            assert (status, headers["etag"], body) == (200, '"e"', b"")
    finally:
        client.close()
    assert server.connections == 1
    assert server.bodies == [(f"/bucket/k{i}", bytes([i]) * 100_000, str(i)) for i in range(3)]


async def test_a_server_that_closes_gets_a_new_connection_per_request(server: _Server) -> None:
    server.close_after_answer = True
    client = _client(server)
    try:
        for i in range(3):
            assert (await client.put(f"/bucket/k{i}", b"x", {}))[0] == 200
    finally:
        client.close()
    assert server.connections == 3


async def test_a_kept_connection_the_server_dropped_is_replaced(server: _Server) -> None:
    client = _client(server)
    try:
        assert (await client.put("/bucket/a", b"1", {}))[0] == 200
        # The server drops the idle connection (as S3 does after a while).
        await asyncio.to_thread(server.handlers[0].connection.shutdown, socket.SHUT_RDWR)
        assert (await client.put("/bucket/b", b"2", {}))[0] == 200
    finally:
        client.close()
    assert [path for path, _, _ in server.bodies] == ["/bucket/a", "/bucket/b"]
    assert server.connections == 2


async def test_close_ends_a_request_in_flight_at_once(server: _Server) -> None:
    server.hold.set()
    client = _client(server)
    upload = asyncio.create_task(client.put("/bucket/slow", b"z" * 1000, {}))
    # The request has reached the server, which holds its answer back.
    assert await asyncio.to_thread(server.received.wait, 5.0)
    client.close()
    with pytest.raises(OSError):
        await asyncio.wait_for(upload, 3.0)
    with pytest.raises(ConnectionAbortedError):
        await client.put("/bucket/after", b"", {})


async def test_an_endpoint_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        HttpPut("ftp://x/", workers=1, connect_timeout=1, read_timeout=1, tls=_TLS)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1 (PEM files)."""
    key, cert = self_signed()
    key_file, cert_file = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_file.write_bytes(key)
    cert_file.write_bytes(cert)
    return key_file, cert_file


async def test_an_https_endpoint_is_verified_against_the_given_ca(
    server: _Server, tmp_path: Path
) -> None:
    key_file, cert_file = _self_signed(tmp_path)
    served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    served.load_cert_chain(cert_file, key_file)
    server.socket = served.wrap_socket(server.socket, server_side=True)
    host, port = server.server_address[:2]
    trusting = ssl.create_default_context(cafile=str(cert_file))
    client = HttpPut(
        f"https://{host!s}:{port}/", workers=1, connect_timeout=2, read_timeout=5, tls=trusting
    )
    try:
        assert (await client.put("/bucket/tls", b"secret", {}))[0] == 200
    finally:
        client.close()
    assert server.bodies == [("/bucket/tls", b"secret", "")]
    # The system's CAs do not know this certificate: refused before anything is sent.
    stranger = HttpPut(
        f"https://{host!s}:{port}/", workers=1, connect_timeout=2, read_timeout=5, tls=_TLS
    )
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await stranger.put("/bucket/tls2", b"secret", {})
    finally:
        stranger.close()
    assert len(server.bodies) == 1
