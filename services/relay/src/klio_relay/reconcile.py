"""Reconciliation: Tier 1 against the Tier-2 journal, at start and every N seconds.

Events are news, the catalog is the truth: an event lost while the relay or NATS was down, or a
message given up on, is made good here by walking the Tier-1 directory and relaying whatever the
journal does not list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence

from klio_common.errors import KlioError, Permanent
from klio_common.pg.walname import history_name
from klio_common.storage.layout import manifest_path, wal_path
from klio_relay.cluster import ClusterRelay
from klio_relay.probe import BucketProbe
from klio_relay.window import Window

log = logging.getLogger("klio.relay")


def scan_wal(relay: ClusterRelay) -> dict[str, tuple[str, int, float]]:
    """WAL files on Tier 1 that the journal does not list: path → (name, size, mtime)."""
    found: dict[str, tuple[str, int, float]] = {}
    archive = relay.archive
    files = list(archive.iter_segment_files())
    files += [(history_name(t), archive.history_path(t)) for t in archive.list_history()]
    for name, file in files:
        path = wal_path(name)
        if path in relay.state:
            continue
        try:
            stat = file.stat()
        except FileNotFoundError:
            continue  # removed since the listing (retention)
        found[path] = (name, stat.st_size, stat.st_mtime)
    return found


async def reconcile_cluster(relay: ClusterRelay) -> int:
    """Relay everything of one cluster that Tier 1 has and the journal does not list.

    Objects that fail for good are alerted (once per reason) and skipped; a bucket outage ends
    the pass early.

    Returns:
        How many WAL files and backups were relayed.

    Raises:
        Retryable: the bucket cannot be used now, or the relay is stopping.
    """
    pending = await asyncio.to_thread(scan_wal, relay)
    relay.lag.replace_wal({p: (size, mtime) for p, (_, size, mtime) in pending.items()})
    relayed = 0

    async def settle(group: list[tuple[tuple[str, int, float], bool | BaseException]]) -> None:
        nonlocal relayed
        relayed += sum(1 for _, r in group if r is True)

    def work(item: tuple[str, int, float]) -> Awaitable[bool]:
        name, size, mtime = item
        return relay.wal_file(name, origin="reconcile", size=size, since=mtime)

    items = [entry for _, entry in sorted(pending.items())]
    window = Window(work, relay.window, settle, fatal=lambda exc: not isinstance(exc, Permanent))
    errors = await window.run(items)
    _raise_transient(errors)
    ids = await asyncio.to_thread(relay.catalog.ids)
    for backup_id in ids:
        if manifest_path(backup_id) in relay.state:
            continue
        try:
            relayed += await relay.backup(backup_id, origin="reconcile")
        except Permanent:
            continue  # alerted; the next backup may be fine
    return relayed


def _raise_transient(results: Sequence[object]) -> None:
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Permanent):
            raise result


class Reconciler:
    """Runs `reconcile_cluster` for every cluster, every ``interval`` seconds and on `wake`.

    Args:
        relays: the clusters.
        probe: reconciliation waits while the bucket is unusable.
        interval: seconds between passes (``relay.reconcile_interval``).
        wake: set it to start a pass now (e.g. when the bucket answers again).
    """

    def __init__(
        self,
        relays: Sequence[ClusterRelay],
        probe: BucketProbe,
        interval: float,
        wake: asyncio.Event | None = None,
    ) -> None:
        self.relays = list(relays)
        self.probe = probe
        self.interval = interval
        self.wake = wake if wake is not None else asyncio.Event()
        self.passes = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile until ``stop``."""
        while not stop.is_set():
            if not await self.probe.wait_usable(stop):
                return
            self.wake.clear()
            for relay in self.relays:
                try:
                    count = await reconcile_cluster(relay)
                except KlioError as exc:
                    log.info("cluster %s: reconciliation paused: %s", relay.cluster, exc.message)
                    continue
                except Exception:
                    log.exception("cluster %s: reconciliation failed", relay.cluster)
                    continue
                if count:
                    log.info("cluster %s: reconciliation relayed %d items", relay.cluster, count)
            self.passes += 1
            await _wait_any(stop, self.wake, self.interval)


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
