"""Wiring of the retention service: per cluster a runner and an outbox; one consumer of backups."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime

from nats.aio.msg import Msg

from klio_common import compression
from klio_common.crypto import KeyRing
from klio_common.errors import ConfigError, KlioError, Retryable
from klio_common.events import BackupDone, Event
from klio_common.events.subjects import all_clusters, durable
from klio_common.runtime.buskeeper import BusKeeper
from klio_common.runtime.health import Health
from klio_common.runtime.outbox import Outbox
from klio_common.runtime.settings import Settings
from klio_common.storage.s3 import S3Store
from klio_retention.cluster import ClusterSetup
from klio_retention.policy import Policy, parse_policy
from klio_retention.reaper import Reaper
from klio_retention.state import RetentionMetrics

log = logging.getLogger("klio.retention")
SERVICE = "retention"


def build_setups(
    settings: Settings, metrics: RetentionMetrics, store: S3Store | None
) -> dict[str, ClusterSetup]:
    """A setup per configured cluster, with its policies parsed.

    Raises:
        ConfigError: no Tier 1, a policy that cannot be parsed or keeps no backup, or a Tier-2
            policy without a Tier 2 (every problem at once).
    """
    if settings.tier1 is None:
        raise ConfigError(["tier1.path: the retention service needs the Tier-1 directory"])
    tier1 = settings.tier1
    keyring = settings.encryption.keyring() if settings.encryption else KeyRing.none()
    codec = compression.get(settings.compression.algorithm, settings.compression.level)
    problems: list[str] = []
    setups: dict[str, ClusterSetup] = {}
    for cluster in settings.clusters:
        policies: dict[int, Policy] = {}
        for tier, text in ((1, cluster.retention.tier1), (2, cluster.retention.tier2)):
            if text is None:
                continue
            if tier == 2 and settings.tier2 is None:
                problems.append(
                    f"clusters[{cluster.name}].retention.tier2: a Tier-2 policy ({text!r}) "
                    "but no tier2 is configured"
                )
                continue
            try:
                policies[tier] = parse_policy(text, cluster=cluster.name, tier=tier)
            except ConfigError as exc:
                problems += exc.problems
        setups[cluster.name] = ClusterSetup(
            name=cluster.name,
            root=tier1.path,
            keyring=keyring,
            codec=codec,
            policies=policies,
            minimum_redundancy=settings.retention.minimum_redundancy,
            chunk_grace=settings.retention.chunk_grace,
            outbox=Outbox(
                tier1.path / cluster.name / "outbox" / SERVICE,
                file_mode=tier1.file_mode,
                dir_mode=tier1.dir_mode,
            ),
            metrics=metrics,
            store=store,
            prefix=settings.tier2.s3.prefix if settings.tier2 else "",
            file_mode=tier1.file_mode,
            dir_mode=tier1.dir_mode,
        )
    if problems:
        raise ConfigError(
            problems,
            hint="write 'RECOVERY WINDOW OF <n> DAYS|WEEKS|MONTHS' or 'REDUNDANCY <n>' per tier",
        )
    return setups


class ClusterRunner:
    """Applies one cluster's policies: at start, on every poke, and every ``interval`` seconds.

    Args:
        reaper: the cluster's planner and executor.
        interval: seconds between runs without a poke.
        published: called after each run (wakes the outbox).
    """

    def __init__(self, reaper: Reaper, interval: float, published: asyncio.Event) -> None:
        self.reaper = reaper
        self.interval = interval
        self.published = published
        self.wake = asyncio.Event()
        self.runs = 0

    def poke(self) -> None:
        """Run again soon (a backup finished)."""
        self.wake.set()

    async def run_once(self) -> None:
        """Apply each tier's policy once; a failure is logged and counted, never raised."""
        setup = self.reaper.setup
        for tier in sorted(setup.policies):
            try:
                outcome = await self.reaper.apply(tier, datetime.now(UTC))
            except KlioError as exc:
                setup.metrics.failures.labels(setup.name, str(tier)).inc()
                log.warning(
                    "cluster %s: retention on tier %d did not run: %s",
                    setup.name,
                    tier,
                    exc.message,
                    extra={"cluster": setup.name, "hint": exc.hint},
                )
                continue
            if outcome.expired or outcome.wal or outcome.chunks:
                log.info(
                    "cluster %s: tier %d: %d backup(s) expired, %d WAL file(s) and %d chunk(s) "
                    "deleted, %d bytes freed",
                    setup.name,
                    tier,
                    len(outcome.expired),
                    outcome.wal,
                    outcome.chunks,
                    outcome.bytes,
                )
        self.runs += 1
        self.published.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop``."""
        while not stop.is_set():
            self.wake.clear()
            await self.run_once()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())]
            try:
                await asyncio.wait(
                    waiters, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)


def handler(runners: Mapping[str, ClusterRunner]) -> object:
    """The handler of ``klio.*.backup.done``: run that cluster's retention soon."""

    async def handle(event: Event, msg: Msg) -> None:
        if not isinstance(event, BackupDone):
            return
        runner = runners.get(event.cluster)
        if runner is not None:
            runner.poke()

    return handle


async def _consume(
    keeper: BusKeeper, runners: Mapping[str, ClusterRunner], stop: asyncio.Event, health: Health
) -> None:
    handle = handler(runners)
    while not stop.is_set():
        waiter = asyncio.ensure_future(keeper.connected.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        bus = keeper.bus
        if bus is None:
            continue
        health.set_ready("backups", True, "consuming backup.done")
        try:
            await bus.consume(
                durable=durable(SERVICE, BackupDone),
                filter_subject=all_clusters(BackupDone),
                handler=handle,  # type: ignore[arg-type]
                stop=stop,
            )
        except Retryable as exc:
            health.set_ready("backups", False, exc.message)
            log.warning("cannot consume backup.done: %s", exc.message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)


async def main(settings: Settings, stop: asyncio.Event, health: Health) -> None:
    """Run the retention service until ``stop``."""
    metrics = RetentionMetrics()
    store = S3Store(settings.tier2.s3) if settings.tier2 is not None else None
    setups = build_setups(settings, metrics, store)
    keeper = BusKeeper(settings.nats, name=f"klio-{SERVICE}")
    health.add_check("nats", keeper.readiness)
    health.set_ready("backups", False, "not connected to NATS yet")
    tasks = [asyncio.create_task(keeper.run(stop), name="nats")]
    runners: dict[str, ClusterRunner] = {}
    for name, setup in setups.items():
        if not setup.policies:
            log.info("cluster %s: no retention policy: every backup is kept", name)
        else:
            shown = ", ".join(
                f"tier {t}: {p.describe()}" for t, p in sorted(setup.policies.items())
            )
            log.info("cluster %s: %s", name, shown)
        published = asyncio.Event()
        runner = ClusterRunner(Reaper(setup), settings.retention.interval, published)
        runners[name] = runner
        tasks.append(
            asyncio.create_task(
                setup.outbox.run(keeper.get, stop, published), name=f"outbox:{name}"
            )
        )
        tasks.append(asyncio.create_task(runner.run(stop), name=f"retention:{name}"))
    tasks.append(asyncio.create_task(_consume(keeper, runners, stop, health), name="backups"))
    try:
        await stop.wait()
    finally:
        for runner in runners.values():
            runner.reaper.stopping = True  # a run in progress ends after the file in hand
        await asyncio.gather(*tasks, return_exceptions=True)
        bus = keeper.bus
        if bus is not None and bus.is_connected:
            for setup in setups.values():
                with contextlib.suppress(Retryable):
                    await setup.outbox.drain(bus)
        await keeper.close()
        if store is not None:
            await store.close()
