"""Wiring of the basebackup: per cluster a runner, an outbox and a schedule; one consumer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.msg import Msg

from klio_basebackup.backup import ClusterContext
from klio_basebackup.schedule import ClusterRunner, check_schedule
from klio_basebackup.state import BackupMetrics
from klio_common import compression
from klio_common.catalog.backups import BackupCatalog
from klio_common.catalog.chunks import ChunkStore
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.errors import ConfigError, KlioError, NotFound, Retryable
from klio_common.events import BackupRequested, Event, subjects
from klio_common.runtime.buskeeper import BusKeeper
from klio_common.runtime.health import Health
from klio_common.runtime.outbox import Outbox
from klio_common.runtime.settings import Settings

log = logging.getLogger("klio.basebackup")
SERVICE = "basebackup"


def build_runners(settings: Settings, metrics: BackupMetrics) -> dict[str, ClusterRunner]:
    """A runner per configured cluster.

    Raises:
        ConfigError: no Tier-1 path, or an invalid schedule.
    """
    if settings.tier1 is None:
        raise ConfigError(["tier1.path: the basebackup service needs a Tier-1 directory"])
    tier1 = settings.tier1
    keyring = settings.encryption.keyring() if settings.encryption else KeyRing.none()
    codec = compression.get(settings.compression.algorithm, settings.compression.backup)
    runners = {}
    for cluster in settings.clusters:
        check_schedule(cluster.name, cluster.backup_schedule)
        archive = WalArchive(
            tier1.path, cluster.name, file_mode=tier1.file_mode, dir_mode=tier1.dir_mode
        )
        fm, dm = tier1.file_mode, tier1.dir_mode
        ctx = ClusterContext(
            cluster=cluster,
            backup=settings.backup,
            archive=archive,
            catalog=BackupCatalog(archive.cluster_dir, keyring, codec, file_mode=fm, dir_mode=dm),
            store=ChunkStore(archive.cluster_dir, keyring, codec, file_mode=fm, dir_mode=dm),
            outbox=Outbox(archive.cluster_dir / "outbox" / SERVICE, file_mode=fm, dir_mode=dm),
            wake=lambda: None,  # replaced in main, once the loop exists
            keyring=keyring,
            codec=codec,
            metrics=metrics,
            file_mode=fm,
            dir_mode=dm,
        )
        runners[cluster.name] = ClusterRunner(ctx)
        _restore_metrics(ctx)
    return runners


def _restore_metrics(ctx: ClusterContext) -> None:
    """Set the last-success metrics from the catalog, so a restart does not silence an alert on
    the age of the newest backup until the next backup."""
    try:
        manifests = ctx.catalog.manifests()  # ordered by end time
        newest = manifests[-1] if manifests else None
    except (KlioError, OSError) as exc:
        log.warning("cluster %s: cannot read the backup catalog: %s", ctx.name, exc)
        return
    if newest is None:
        return
    ctx.metrics.last_success.labels(ctx.name).set(newest.end_time.timestamp())
    ctx.metrics.duration.labels(ctx.name).set((newest.end_time - newest.start_time).total_seconds())
    ctx.metrics.chunks_new.labels(ctx.name).set(newest.chunks_new)


def request_handler(runners: dict[str, ClusterRunner]) -> Callable[[Event, Msg], object]:
    """The handler of ``klio.*.backup.requested``."""

    async def handle(event: Event, msg: Msg) -> None:
        if not isinstance(event, BackupRequested):
            return
        runner = runners.get(event.cluster)
        if runner is None:
            known = ", ".join(sorted(runners)) or "none"
            raise NotFound(
                f"backup requested for unknown cluster '{event.cluster}'",
                hint=f"clusters configured for klio-basebackup: {known}",
            )
        log.info(
            "cluster %s: backup requested by %s (request %s)",
            event.cluster,
            event.requested_by,
            event.request_id,
        )
        runner.request(event.request_id)

    return handle


def _waker(loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> Callable[[], None]:
    """A thread-safe way to wake the outbox publisher."""

    def waker() -> None:
        loop.call_soon_threadsafe(wake.set)

    return waker


async def _consume(
    keeper: BusKeeper, runners: dict[str, ClusterRunner], stop: asyncio.Event, health: Health
) -> None:
    handler = request_handler(runners)
    while not stop.is_set():
        waiter = asyncio.ensure_future(keeper.connected.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        bus = keeper.bus
        if bus is None:
            continue
        health.set_ready("requests", True, "consuming backup.requested")
        try:
            await bus.consume(
                durable=subjects.durable(SERVICE, BackupRequested),
                filter_subject=subjects.all_clusters(BackupRequested),
                handler=handler,  # type: ignore[arg-type]
                stop=stop,
            )
        except Retryable as exc:
            health.set_ready("requests", False, exc.message)
            log.warning("cannot consume backup requests: %s", exc.message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)


async def main(settings: Settings, stop: asyncio.Event, health: Health) -> None:
    """Run the basebackup service until ``stop``."""
    metrics = BackupMetrics()
    runners = build_runners(settings, metrics)
    loop = asyncio.get_running_loop()
    keeper = BusKeeper(settings.nats, name=f"klio-{SERVICE}")
    health.set_ready("requests", False, "not connected to NATS yet")
    health.add_check("nats", keeper.readiness)
    tasks = [asyncio.create_task(keeper.run(stop), name="nats")]
    for name, runner in runners.items():
        wake = asyncio.Event()
        runner.ctx.wake = _waker(loop, wake)
        await asyncio.to_thread(runner.reconcile)
        tasks.append(
            asyncio.create_task(
                runner.ctx.outbox.run(keeper.get, stop, wake), name=f"outbox:{name}"
            )
        )
        tasks.append(asyncio.create_task(runner.run_schedule(stop), name=f"schedule:{name}"))
    tasks.append(asyncio.create_task(_consume(keeper, runners, stop, health), name="requests"))
    try:
        await stop.wait()
    finally:
        await asyncio.gather(*(r.shutdown() for r in runners.values()), return_exceptions=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in runners.values():  # publish the last events (backup.failed on a stop)
            bus = keeper.bus
            if bus is not None and bus.is_connected:
                with contextlib.suppress(Retryable):
                    await runner.ctx.outbox.drain(bus)
        await keeper.close()
