"""Wiring of the relay: the bucket, its probe, one relay per cluster, consumers, reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

import aioboto3
from nats.aio.msg import Msg

from klio_common import compression
from klio_common.crypto import KeyRing
from klio_common.errors import ConfigError, KlioError, Permanent, VolumeFull
from klio_common.events import BackupDone, Event, WalHistoryArchived, WalSegmentClosed, tag_of
from klio_common.events.subjects import all_clusters, durable
from klio_common.runtime.bus import Handler
from klio_common.runtime.buskeeper import BusKeeper
from klio_common.runtime.health import Health
from klio_common.runtime.settings import Settings
from klio_common.storage.layout import wal_path
from klio_common.storage.s3 import S3Store
from klio_relay.cluster import ClusterRelay
from klio_relay.probe import BucketProbe
from klio_relay.reconcile import Reconciler
from klio_relay.state import RelayMetrics

log = logging.getLogger("klio.relay")
SERVICE = "relay"
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# An outage of the bucket is waited out for days (naks every minute), not dead-lettered.
MAX_DELIVER = 10_000
STOP_WAIT = 10.0  # seconds of the shutdown grace given to uploads in flight


def handler(relays: Mapping[str, ClusterRelay], health: Health) -> Handler:
    """The handler of every event the relay consumes (the bus settles the message).

    A full Tier 1 (no room for the journal or the announcements) makes the relay unready until
    an event is handled again: it uploads, but can record and announce nothing.
    """

    async def handle(event: Event, msg: Msg) -> None:
        try:
            await _handle(event)
        except VolumeFull as exc:
            health.set_ready("tier1", False, exc.message)
            raise
        health.set_ready("tier1", True, "writable")

    async def _handle(event: Event) -> None:
        relay = relays.get(event.cluster)
        if relay is None:
            raise Permanent(
                f"cluster '{event.cluster}' is not configured in this relay",
                hint="add it to clusters: in the relay's configuration",
            )
        if isinstance(event, WalSegmentClosed | WalHistoryArchived):
            if event.path != wal_path(event.segment):
                raise Permanent(f"{event.segment} announced at unexpected path '{event.path}'")
            await relay.wal_file(
                event.segment,
                origin="event",
                size=event.stored_size,
                since=event.occurred_at.timestamp(),
            )
        elif isinstance(event, BackupDone):
            await relay.backup(event.backup_id, origin="event")
        else:
            raise Permanent(f"the relay does not handle {tag_of(event)} events")

    return handle


async def _consume(
    keeper: BusKeeper, event_type: type[Event], handle: Handler, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        bus = keeper.get()
        if bus is None:
            return
        try:
            await bus.consume(
                durable=durable(SERVICE, event_type),
                filter_subject=all_clusters(event_type),
                handler=handle,
                stop=stop,
                batch=1,  # several consumers share the work, one message each
                max_deliver=MAX_DELIVER,
                backoff=BACKOFF,
            )
        except KlioError as exc:
            log.warning("consumer of %s stopped: %s", tag_of(event_type), exc.message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def main(settings: Settings, stop: asyncio.Event, health: Health) -> None:
    """Run the relay until ``stop``."""
    problems = []
    if settings.tier1 is None:
        problems.append("tier1.path: the relay copies the Tier-1 directory and needs it")
    if settings.tier2 is None:
        problems.append("tier2.s3: the relay needs a bucket (tier2.s3.bucket)")
    if settings.tier1 is None or settings.tier2 is None:
        raise ConfigError(problems)
    keyring = settings.encryption.keyring() if settings.encryption else KeyRing.none()
    codec = compression.get(settings.compression.algorithm, settings.compression.level)
    metrics = RelayMetrics()
    config = settings.relay
    s3 = settings.tier2.s3
    # The probe gives up quickly, so /readyz answers while uploads still wait for theirs.
    session = aioboto3.Session()
    async with (
        S3Store(s3, observer=metrics.observe, read_timeout=30.0, session=session) as store,
        S3Store(
            s3, observer=metrics.observe, read_timeout=5.0, attempts=1, session=session
        ) as probe_store,
    ):
        wake = asyncio.Event()
        probe = BucketProbe(probe_store, on_usable=wake.set)
        slots = asyncio.Semaphore(config.concurrency)
        relays = {
            c.name: ClusterRelay(
                c.name,
                settings.tier1,
                keyring,
                codec,
                store,
                settings.tier2.s3.prefix,
                metrics,
                probe,
                slots,
                8 * config.concurrency,
                config.multipart_threshold,
                stop,
            )
            for c in settings.clusters
        }
        reconciler = Reconciler(list(relays.values()), probe, config.reconcile_interval, wake)
        keeper = BusKeeper(settings.nats, name=f"klio-{SERVICE}")
        health.add_check("bucket", probe.readiness)
        health.add_check("nats", keeper.readiness)
        health.set_ready("consumers", False, "waiting for the bucket")
        tasks = [
            asyncio.create_task(keeper.run(stop), name="nats"),
            asyncio.create_task(probe.run(stop), name="bucket-probe"),
            asyncio.create_task(
                _work(relays, probe, keeper, reconciler, health, stop, config.concurrency),
                name="work",
            ),
        ]
        tasks += [
            asyncio.create_task(r.outbox.run(keeper.get, stop, r.outbox_wake), name=f"outbox:{n}")
            for n, r in relays.items()
        ]
        try:
            await stop.wait()
        finally:
            await _wind_down(tasks)
            await keeper.close()


async def _work(
    relays: Mapping[str, ClusterRelay],
    probe: BucketProbe,
    keeper: BusKeeper,
    reconciler: Reconciler,
    health: Health,
    stop: asyncio.Event,
    concurrency: int,
) -> None:
    """Once the bucket answers: load the journals, then reconcile and consume until ``stop``."""
    for relay in relays.values():
        while not stop.is_set():
            if not await probe.wait_usable(stop):
                return
            try:
                await relay.open()
                break
            except KlioError as exc:
                log.warning("cluster %s: cannot load the Tier-2 state: %s", relay.cluster, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
    if stop.is_set():
        return
    tasks = [asyncio.create_task(reconciler.run(stop), name="reconcile")]
    health.set_ready("consumers", False, "waiting for NATS")
    await _first(keeper.connected, stop)
    handle = handler(relays, health)
    if not stop.is_set():
        # One segment consumer per upload slot; history files and backups are rare.
        consumers: list[tuple[type[Event], int]] = [
            (WalSegmentClosed, concurrency),
            (WalHistoryArchived, 1),
            (BackupDone, 1),
        ]
        for event_type, count in consumers:
            for i in range(count):
                tasks.append(
                    asyncio.create_task(
                        _consume(keeper, event_type, handle, stop), name=f"{tag_of(event_type)}:{i}"
                    )
                )
        health.set_ready("consumers", True, "bound")
        log.info("relaying %s", ", ".join(relays) or "no cluster")
    await asyncio.gather(*tasks, return_exceptions=True)


async def _wind_down(tasks: list[asyncio.Task[None]]) -> None:
    """Let the tasks finish what they hold; cancel uploads a frozen bucket keeps hanging.

    A cancelled upload is harmless: its message is redelivered, its object relayed again.
    """
    _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT)
    for task in pending:
        log.warning("stopping %s without waiting for it any longer", task.get_name())
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
