"""Keeping a service's NATS connection: connect in the background, never block the service on it.

Every service makes its facts durable on the volume first (the outbox), so NATS being away must
never stop archiving or backing up: the keeper retries with backoff while the service works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from klio_common.errors import KlioError
from klio_common.runtime.bus import Bus
from klio_common.runtime.settings import NatsSettings

log = logging.getLogger("klio.bus")


class BusKeeper:
    """Connects to NATS (and provisions the stream) in the background, with backoff.

    Args:
        settings: the NATS settings.
        name: the client name, e.g. ``klio-relay``.
    """

    def __init__(self, settings: NatsSettings, *, name: str) -> None:
        self.settings = settings
        self.name = name
        self.bus: Bus | None = None
        self.connected = asyncio.Event()

    def get(self) -> Bus | None:
        """The bus once connected, else None (for `Outbox.run`)."""
        return self.bus

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: connected and answering, or why not."""
        if self.bus is None:
            return False, f"not connected to NATS at {self.settings.url}"
        return self.bus.ready()

    async def run(self, stop: asyncio.Event) -> None:
        """Connect and ensure the stream, retrying until it works or ``stop`` is set."""
        delay = 0.5
        while not stop.is_set() and self.bus is None:
            try:
                bus = await Bus.connect(self.settings, name=self.name)
                await bus.ensure_stream()
                self.bus = bus
                self.connected.set()
            except KlioError as exc:
                log.warning("NATS not available yet: %s", exc.message)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)

    async def close(self) -> None:
        """Drain and close the connection (idempotent)."""
        if self.bus is not None:
            await self.bus.close()
            self.bus = None
