"""The outbox: events made durable on the volume first, published to NATS when it answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from klio_common.errors import Permanent, Retryable
from klio_common.events import Event, codec
from klio_common.fsio import atomic_write, is_temp_name
from klio_common.runtime import metrics
from klio_common.runtime.bus import Bus

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_INTERVAL = 5.0
_FIRST_RETRY = 0.25
_MAX_RETRY = 5.0

_pending_gauge = metrics.gauge(
    "klio_outbox_pending", "Events stored in the outbox and not yet published", ("outbox",)
)


class Outbox:
    """A directory of events waiting to be published, oldest first.

    ``put`` returns once the event survives a crash; ``drain`` publishes and then deletes.
    An event may be published twice (a crash between the ack and the delete); its ``event_id``
    is the ``Nats-Msg-Id``, so JetStream drops the repeat.

    Args:
        directory: e.g. ``<tier1>/<cluster>/outbox/<service>``; created on first ``put``.
        file_mode: mode of the event files.
        dir_mode: mode of created directories.
    """

    def __init__(self, directory: Path, *, file_mode: int = 0o640, dir_mode: int = 0o750) -> None:
        self.directory = directory
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._last_stamp = 0
        self._lock = asyncio.Lock()
        self._gauge = _pending_gauge.labels(str(directory))

    def put(self, event: Event) -> Path:
        """Store ``event`` durably (temp file, fsync, rename, fsync of the directory).

        Returns:
            The file written.

        Raises:
            Retryable: the volume is full.
        """
        # Names sort in the order events were put, even if the wall clock steps back.
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        path = self.directory / f"{self._last_stamp:020d}-{_UNSAFE.sub('_', event.event_id)}.json"
        atomic_write(path, codec.encode(event), file_mode=self._file_mode, dir_mode=self._dir_mode)
        self._gauge.inc()
        return path

    def pending(self) -> list[Path]:
        """Return the stored events, oldest first."""
        try:
            names = [
                entry.name
                for entry in self.directory.iterdir()
                if entry.name.endswith(".json") and not is_temp_name(entry.name)
            ]
        except FileNotFoundError:
            names = []
        self._gauge.set(len(names))
        return [self.directory / name for name in sorted(names)]

    async def drain(self, bus: Bus) -> int:
        """Publish every stored event in order, deleting each once JetStream has it.

        Returns:
            How many events were published.

        Raises:
            Retryable: NATS is unreachable; the rest stays stored, in order.
        """
        published = 0
        async with self._lock:
            try:
                for path in self.pending():
                    try:
                        data = path.read_bytes()
                        event = codec.decode(data, subject=str(path))
                    except FileNotFoundError:
                        continue
                    except Permanent as exc:
                        # Set aside rather than block the queue forever; kept for a human to see.
                        path.rename(path.with_suffix(".rejected"))
                        log.error("outbox file set aside as .rejected: %s", exc.message)
                        continue
                    await bus.publish_event(event)
                    path.unlink(missing_ok=True)
                    published += 1
            finally:
                self.pending()  # refresh the gauge
        return published

    async def run(
        self, bus_getter: Callable[[], Bus | None], stop: asyncio.Event, wake: asyncio.Event
    ) -> None:
        """Drain in the background until ``stop`` is set.

        Drains when ``wake`` is set (set it after `put`) and every few seconds; while NATS is
        down, retries with exponential backoff up to 5 s and logs once per outage.

        Args:
            bus_getter: returns the current bus, or None while there is none.
            stop: set to return.
            wake: set to drain now.
        """
        outage: str | None = None
        delay = 0.0
        while not stop.is_set():
            wake.clear()
            bus = bus_getter()
            try:
                if bus is None or not bus.is_connected:
                    raise Retryable("not connected to NATS")
                count = await self.drain(bus)
            except Retryable as exc:
                delay = min(max(delay * 2, _FIRST_RETRY), _MAX_RETRY)
                waiting = len(self.pending())
                if outage is None and waiting:  # an empty outbox loses nothing: no alarm
                    outage = exc.message
                    log.warning(
                        "cannot publish events, %d kept in the outbox until NATS answers: %s",
                        waiting,
                        outage,
                    )
            else:
                if outage is not None:
                    log.info("NATS answers again: published %d events from the outbox", count)
                outage = None
                delay = _INTERVAL
            await _wait_any(stop, wake, delay)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
