"""Wiring of the wal-receiver: one stream, one outbox publisher and one status loop per cluster."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.errors import ConfigError
from klio_common.runtime.buskeeper import BusKeeper
from klio_common.runtime.health import Health
from klio_common.runtime.outbox import Outbox
from klio_common.runtime.settings import Settings
from klio_wal_receiver.announcer import Announcer
from klio_wal_receiver.receiver import ClusterReceiver
from klio_wal_receiver.segments import SegmentWriter
from klio_wal_receiver.state import ReceiverMetrics, ReceiverState

log = logging.getLogger("klio.wal_receiver")
SERVICE = "wal-receiver"
STATUS_EVERY = 2.0


async def main(settings: Settings, stop: asyncio.Event, health: Health) -> None:
    """Run the wal-receiver until ``stop``."""
    if settings.tier1 is None:
        raise ConfigError(["tier1.path: the wal-receiver needs a Tier-1 directory"])
    keyring = settings.encryption.keyring() if settings.encryption else KeyRing.none()
    if keyring.active is None:
        log.warning(
            "encryption is not configured: the WAL archive is stored without encryption "
            "(set encryption.active and encryption.keys)"
        )
    codec = compression.get(settings.compression.algorithm, settings.compression.wal)
    metrics = ReceiverMetrics()
    keeper = BusKeeper(settings.nats, name=f"klio-{SERVICE}")
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(keeper.run(stop), name="nats")]
    health.add_check("nats", keeper.readiness)
    states: list[tuple[ReceiverState, WalArchive]] = []
    for cluster in settings.clusters:
        archive = WalArchive(
            settings.tier1.path,
            cluster.name,
            file_mode=settings.tier1.file_mode,
            dir_mode=settings.tier1.dir_mode,
        )
        state = ReceiverState(cluster.name, cluster.slot, cluster.synchronous, metrics)
        outbox = Outbox(
            archive.cluster_dir / "outbox" / SERVICE,
            file_mode=settings.tier1.file_mode,
            dir_mode=settings.tier1.dir_mode,
        )
        wake = asyncio.Event()
        announcer = Announcer(archive, outbox, keyring, codec, state, _waker(loop, wake))

        def make_writer(
            seg_size: int,
            a: WalArchive = archive,
            an: Announcer = announcer,
            sync: bool = cluster.synchronous,
        ) -> SegmentWriter:
            return SegmentWriter(a, keyring, codec, seg_size, an.closed, synchronous=sync)

        receiver = ClusterReceiver(
            cluster, archive, make_writer, announcer, state, cluster.password()
        )
        health.add_check(f"stream:{cluster.name}", state.readiness)
        tasks.append(asyncio.create_task(receiver.run(stop), name=f"stream:{cluster.name}"))
        tasks.append(
            asyncio.create_task(outbox.run(keeper.get, stop, wake), name=f"outbox:{cluster.name}")
        )
        states.append((state, archive))
    tasks.append(asyncio.create_task(_status_loop(states, stop), name="status"))
    try:
        await stop.wait()
    finally:
        await asyncio.gather(*tasks, return_exceptions=True)
        for state, archive in states:
            _write_status(state, archive)
        await keeper.close()


def _waker(loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> Callable[[], None]:
    """A thread-safe way to wake the outbox publisher."""

    def waker() -> None:
        loop.call_soon_threadsafe(wake.set)

    return waker


def _write_status(state: ReceiverState, archive: WalArchive) -> None:
    try:
        state.publish(archive)
    except OSError as exc:
        log.warning("cannot write status for cluster %s: %s", state.cluster, exc)


async def _status_loop(states: list[tuple[ReceiverState, WalArchive]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for state, archive in states:
            await asyncio.to_thread(_write_status, state, archive)
        try:
            await asyncio.wait_for(stop.wait(), STATUS_EVERY)
        except TimeoutError:
            pass
