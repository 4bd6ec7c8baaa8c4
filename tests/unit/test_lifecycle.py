"""Lifecycle, health endpoint, metrics and logs: a real service in-process and as a process."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from klio_common.errors import ConfigError, Retryable
from klio_common.runtime import logs, metrics
from klio_common.runtime.health import Health
from klio_common.runtime.lifecycle import Main, main_entry, serve
from klio_common.runtime.settings import ServiceSettings, Settings
from klio_dev import free_port
from klio_dev.waiting import scaled, wait_until_async

LOCAL = ServiceSettings(http_port=0, http_host="127.0.0.1")


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    """Return (status, content type, body) of one HTTP/1.0 request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert lines[0].startswith("HTTP/1.0 ")
    assert int(headers["Content-Length"]) == len(body) or method == "HEAD"
    return int(lines[0].split()[1]), headers["Content-Type"], body.decode()


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored after the test (logs.configure changes it)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("nats", "asyncio")}
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)


async def test_health_endpoints_over_http() -> None:
    health = Health("127.0.0.1", 0, cache_seconds=3600)
    calls = 0

    def nats_check() -> tuple[bool, str]:
        nonlocal calls
        calls += 1
        return False, "not connected to NATS at nats://x:4222"

    def broken_check() -> tuple[bool, str]:
        raise RuntimeError("boom")

    health.add_check("nats", nats_check)
    health.add_check("broken", broken_check)
    health.set_ready("stream", False, "no primary")
    await health.start()
    try:
        assert health.port > 0
        assert await http_get(health.port, "/livez") == (200, "text/plain; charset=utf-8", "ok\n")
        status, _, body = await http_get(health.port, "/readyz")
        assert status == 503
        assert body == (
            "not ready\n"
            "nats: not connected to NATS at nats://x:4222\n"
            "broken: check failed: boom\n"
            "stream: no primary\n"
        )
        await http_get(health.port, "/readyz")
        assert calls == 1  # cached
        health.set_ready("stream", True)
        health.add_check("nats", lambda: (True, "connected"))
        health.add_check("broken", lambda: (True, ""))
        assert (await http_get(health.port, "/readyz"))[:3:2] == (200, "ok\n")
        assert (await http_get(health.port, "/nope"))[0] == 404
        assert (await http_get(health.port, "/livez", "POST"))[0] == 405
        assert (await http_get(health.port, "/livez", "HEAD"))[0] == 200
        metrics.counter("klio_test_requests", "Test requests").inc()
        status, content_type, body = await http_get(health.port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=")
        assert "klio_test_requests_total 1.0" in body
    finally:
        await health.close()


def test_metrics_are_get_or_create() -> None:
    first = metrics.gauge("klio_test_gauge", "A gauge", ("cluster",))
    assert metrics.gauge("klio_test_gauge", "A gauge", ("cluster",)) is first
    with pytest.raises(ValueError, match="already exists"):
        metrics.counter("klio_test_gauge", "Not a gauge")
    with pytest.raises(ValueError, match="already exists"):
        metrics.gauge("klio_test_gauge", "A gauge", ("other",))
    hist = metrics.histogram("klio_test_seconds", "Durations", buckets=(1, 10))
    hist.observe(3)
    first.labels("main").set(7)
    text = metrics.exposition().decode()
    assert 'klio_test_gauge{cluster="main"} 7.0' in text
    assert 'klio_test_seconds_bucket{le="10.0"} 1.0' in text


async def test_serve_runs_until_stop_and_returns_0() -> None:
    stop = asyncio.Event()
    seen: list[int] = []

    async def main(stop_: asyncio.Event, health: Health) -> None:
        seen.append(health.port)
        health.set_ready("work", True)
        await stop_.wait()

    service = asyncio.create_task(serve(main, name="demo", settings=LOCAL, stop=stop))
    await wait_until_async(lambda: bool(seen), 30, "the service to start")
    assert (await http_get(seen[0], "/readyz"))[0] == 200
    stop.set()
    assert await asyncio.wait_for(service, 30) == 0
    with pytest.raises(OSError):
        await http_get(seen[0], "/livez")  # the endpoint is closed


async def test_a_main_that_ends_stops_the_service() -> None:
    async def main(stop: asyncio.Event, health: Health) -> None:
        return

    stop = asyncio.Event()
    assert await serve(main, name="demo", settings=LOCAL, stop=stop) == 0
    assert stop.is_set()


async def test_a_klio_error_is_logged_as_message_and_hint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main(stop: asyncio.Event, health: Health) -> None:
        raise Retryable("primary unreachable", hint="check clusters.0.conninfo")

    assert await serve(main, name="demo", settings=LOCAL) == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "demo failed: primary unreachable"
    assert record.__dict__["hint"] == "check clusters.0.conninfo"
    assert record.exc_info is None


async def test_a_bug_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def main(stop: asyncio.Event, health: Health) -> None:
        raise ZeroDivisionError("oops")

    assert await serve(main, name="demo", settings=LOCAL) == 1
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError


async def test_a_main_ignoring_stop_is_cancelled_after_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cancelled = asyncio.Event()

    async def main(stop: asyncio.Event, health: Health) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stop = asyncio.Event()
    stop.set()
    assert await serve(main, name="demo", settings=LOCAL, stop=stop, grace=0.05) == 1
    assert cancelled.is_set()
    assert any("did not stop within" in r.getMessage() for r in caplog.records)


async def test_a_busy_port_fails_with_1(caplog: pytest.LogCaptureFixture) -> None:
    health = Health("127.0.0.1", 0)
    await health.start()
    ran = False

    async def main(stop: asyncio.Event, health: Health) -> None:
        nonlocal ran
        ran = True

    port = health.port
    try:
        busy = ServiceSettings(http_port=port, http_host="127.0.0.1")
        assert await serve(main, name="relay", settings=busy) == 1
    finally:
        await health.close()
    assert not ran
    assert any(f"cannot listen on 127.0.0.1:{port}" in r.getMessage() for r in caplog.records)


SCRIPT = """
import asyncio, sys, time
from klio_common.runtime.lifecycle import run_service
from klio_common.runtime.settings import ServiceSettings

async def main(stop, health):
    print(health.port, flush=True)
    await stop.wait()
    if sys.argv[1] == "hang":
        time.sleep(600)  # a stuck event loop: only the hard exit can end this

settings = ServiceSettings(http_port=0, http_host="127.0.0.1")
sys.exit(run_service(main, name="demo", settings=settings, grace=0.5, hard_exit_after=1.0))
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    script = tmp_path / "service.py"
    script.write_text(textwrap.dedent(SCRIPT))
    process = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def test_sigterm_stops_a_service_process_cleanly(tmp_path: Path) -> None:
    process, port = _start(tmp_path, "clean")
    try:
        assert asyncio.run(http_get(port, "/livez"))[0] == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=scaled(30)) == 0
    finally:
        process.kill()
        process.communicate()


def test_a_stuck_service_process_is_ended_by_the_hard_exit(tmp_path: Path) -> None:
    process, _ = _start(tmp_path, "hang")
    try:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=scaled(60)) == 1
        _, stderr = process.communicate()
        assert "still running 1.0s after the stop request: exiting now" in stderr
    finally:
        process.kill()


def exit_code(call: Callable[[], object]) -> object:
    with pytest.raises(SystemExit) as caught:
        call()
    return caught.value.code


def test_main_entry_runs_the_service(tmp_path: Path, root_logger: logging.Logger) -> None:
    config = tmp_path / "klio.yaml"
    config.write_text(f"services: {{relay: {{http_port: {free_port()}, http_host: 127.0.0.1}}}}")
    started: list[Settings] = []

    def factory(settings: Settings) -> Main:
        started.append(settings)

        async def main(stop: asyncio.Event, health: Health) -> None:
            return

        return main

    assert exit_code(lambda: main_entry("relay", factory, ["--config", str(config)], {})) == 0
    assert started and started[0].service("relay").http_host == "127.0.0.1"


def test_main_entry_reports_configuration_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logger: logging.Logger
) -> None:
    def factory(settings: Settings) -> Main:
        raise AssertionError("not reached")

    code = exit_code(lambda: main_entry("relay", factory, [], {"KLIO_COMPRESSION__LEVEL": "99"}))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("klio-relay: invalid configuration (1 problem(s)):")
    assert "compression.level (from KLIO_COMPRESSION__LEVEL): expected 1 to 22, got 99" in err


def test_main_entry_reports_a_factory_error(
    capsys: pytest.CaptureFixture[str], root_logger: logging.Logger
) -> None:
    def bad_config(settings: Settings) -> Main:
        raise ConfigError(["tier1: missing (required)"])

    def unreachable(settings: Settings) -> Main:
        raise Retryable("cannot connect to NATS")

    assert exit_code(lambda: main_entry("relay", bad_config, [], {})) == 2
    assert exit_code(lambda: main_entry("relay", unreachable, [], {})) == 1
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines()]
    assert lines[0]["level"] == "warning" and "encryption is not configured" in lines[0]["message"]
    assert lines[-1]["message"] == "cannot start relay: cannot connect to NATS"


def test_json_logs(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.configure("relay", "debug", {}, stream)
    log = logging.getLogger("klio_relay.upload")
    log.debug("uploaded %s", "seg", extra={"segment": "000000010000000000000001", "size": 3})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(first) == {"time", "level", "service", "logger", "message", "segment", "size"}
    assert first["level"] == "debug" and first["service"] == "relay"
    assert first["logger"] == "klio_relay.upload" and first["message"] == "uploaded seg"
    assert first["segment"] == "000000010000000000000001" and first["size"] == 3
    assert first["time"].endswith("+00:00")
    assert second["level"] == "error" and "ValueError: bad" in second["traceback"]


def test_text_logs_and_level(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.configure("relay", "warning", {"KLIO_LOG_FORMAT": "text"}, stream)
    logs.configure("relay", "warning", {"KLIO_LOG_FORMAT": "text"}, stream)  # not doubled
    log = logging.getLogger("klio_relay")
    log.info("hidden")
    log.warning("slow upload", extra={"seconds": 12})
    [line] = stream.getvalue().splitlines()
    assert line.endswith(" warning relay klio_relay: slow upload seconds=12")
    assert logging.getLogger("nats").level == logging.WARNING
