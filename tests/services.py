"""Running the real Klio services from tests: in-process on a thread, or as separate processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from klio_common.runtime.health import Health
from klio_common.runtime.settings import Settings

VENV_BIN = Path(sys.executable).parent

ServiceMain = Callable[[Settings, asyncio.Event, Health], Coroutine[Any, Any, None]]


@contextmanager
def service_inprocess(
    name: str, main: ServiceMain, settings: Settings, *, join_timeout: float = 90
) -> Iterator[None]:
    """Run a service's real ``main`` in this process, on its own thread and event loop.

    The test body stays synchronous (pgbench, psql, polling) while the service works; leaving the
    block stops the service as SIGTERM would and checks that it exited cleanly.
    """
    from klio_common.runtime.lifecycle import serve

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    result: list[int] = []

    async def body() -> None:
        result.append(
            await serve(
                lambda s, h: main(settings, s, h),
                name=name,
                settings=settings.service(name),
                stop=stop,
            )
        )

    thread = threading.Thread(target=loop.run_until_complete, args=(body(),), daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(join_timeout)
        loop.close()
    assert not thread.is_alive(), f"klio-{name} did not stop within {join_timeout:.0f} s"
    assert result == [0], f"klio-{name} exited with {result}"


class ServiceProcess:
    """A real ``klio-<name>`` process (for kill -9, SIGSTOP and restarts)."""

    def __init__(self, name: str, config: Path, log: Path) -> None:
        self.name = name
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / f"klio-{self.name}"), "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "KLIO_LOG_FORMAT": "text"},
            )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM (after SIGCONT, in case it was stopped) and wait; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        return self.proc.wait(60)


def stream_events(nats_url: str, subject: str, *, idle: float = 1.0) -> list[dict[str, Any]]:
    """Every event stored in the KLIO stream on ``subject`` (a filter), oldest first, as JSON.

    Reads until nothing arrives for ``idle`` seconds; an absent stream means no events yet.
    """
    import msgspec
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    async def read() -> list[dict[str, Any]]:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            try:
                await js.stream_info("KLIO")
            except NotFoundError:
                return []
            sub = await js.subscribe(
                subject,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            )
            found: list[dict[str, Any]] = []
            try:
                while True:
                    msg = await sub.next_msg(timeout=idle)
                    found.append(msgspec.json.decode(msg.data))
            except TimeoutError:
                return found
            finally:
                await sub.unsubscribe()
        finally:
            await nc.close()

    return asyncio.run(read())
