"""The executor: deletes what a plan says, in the order that never breaks a backup.

Per tier: the expired backups' manifests first (each backup is invisible from then on), then
their directories; then, from a fresh look at what remains, the WAL no remaining backup needs and
the chunks none references. A crash anywhere leaves garbage that the next run removes, never a
listed backup that lacks a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

from klio_common import fsio
from klio_common.catalog.backups import BackupCatalog
from klio_common.events import RetentionBackupExpired, RetentionWalPruned, now
from klio_common.events.base import SYSTEM_ID_UNKNOWN
from klio_common.events.codec import event_id_for
from klio_common.storage.layout import chunk_path, manifest_path, wal_path
from klio_common.storage.tier2state import (
    TOMBSTONES,
    UNKNOWN_SHA256,
    Tier2Entry,
)
from klio_retention.cluster import ClusterSetup, Outcome, fault_point, run_lock
from klio_retention.planner import DeletionPlan, plan
from klio_retention.snapshot import ASIDE, Snapshot, WalEntry, tier1_snapshot

log = logging.getLogger("klio.retention")
_LEASE_RECHECK = 256
LEFTOVER_AGE = 60.0
"""A backup directory without manifest or lease is a crash's leftover only when at least this old
(younger, it may be a backup between creating its directory and writing its lease)."""


class Reaper:
    """Plans and applies one cluster's retention on either tier.

    Args:
        setup: the cluster.
    """

    def __init__(self, setup: ClusterSetup) -> None:
        self.setup = setup
        self.stopping = False  # set by the service's loop; checked between files
        self._system_id: str | None = None

    # -- planning -------------------------------------------------------------------------------

    async def snapshot(self, tier: int, now_: datetime) -> Snapshot:
        """The tier's catalog now (Tier 2: with the object locks of what the policy expires)."""
        s = self.setup
        if tier == 1:
            return await asyncio.to_thread(
                tier1_snapshot,
                s.root,
                s.name,
                s.keyring,
                s.catalog(),
                tier2=s.store is not None,
                young_after=now_.timestamp() - max(s.chunk_grace, LEFTOVER_AGE),
            )
        protected = frozenset(await asyncio.to_thread(s.catalog().known_chunks))
        return await s.bucket().snapshot(protected)

    async def plan(self, tier: int, now_: datetime, *, policy: bool = True) -> DeletionPlan:
        """What a run at ``now_`` would delete from ``tier`` (nothing is deleted).

        Args:
            tier: 1 or 2.
            now_: the time to plan for.
            policy: False keeps every backup (what remains after the manifests went).
        """
        started = time.monotonic()
        snap = await self.snapshot(tier, now_)
        result = self._plan(snap, tier, now_, policy)
        if tier == 2 and not result.empty and await self.setup.bucket().lock_enabled():
            paths = [manifest_path(b.id) for b in result.expired]
            paths += [wal_path(w.name) for w in result.wal]
            paths += [chunk_path(c.id) for c in result.chunks]
            locks = await self.setup.bucket().locks(paths, now_)
            result = self._plan(snap.with_locks(locks), tier, now_, policy)
        labels = (self.setup.name, str(tier))
        self.setup.metrics.plan_seconds.labels(*labels).set(time.monotonic() - started)
        held = len(result.held) + sum(result.chunks_held.values())
        held += sum(1 for b in result.backups if b.action == "hold")
        self.setup.metrics.held.labels(*labels).set(held)
        return result

    def _plan(self, snap: Snapshot, tier: int, now_: datetime, policy: bool) -> DeletionPlan:
        s = self.setup
        return plan(
            snap,
            now_,
            s.policies[tier] if policy else None,
            minimum_redundancy=s.minimum_redundancy,
            chunk_grace=s.chunk_grace,
        )

    # -- applying -------------------------------------------------------------------------------

    async def apply(self, tier: int, now_: datetime, *, lock_wait: float = 600.0) -> Outcome:
        """Plan and delete now; returns once the deletions are done and announced.

        Raises:
            Retryable: another run holds the cluster, or the bucket is unavailable.
        """
        lock = run_lock(self.setup.cluster_dir, wait=lock_wait)
        await asyncio.to_thread(lock.__enter__)
        try:
            first = await self.plan(tier, now_)
            outcome = Outcome(tier, first)
            if tier == 1:
                await asyncio.to_thread(self._backups_tier1, outcome)
            else:
                await self._backups_tier2(outcome)
            fault_point("manifests")
            # What remains decides what WAL and chunks go: a manifest that could not be deleted
            # keeps everything it needs.
            rest = await self.plan(tier, now_, policy=False)
            if tier == 1:
                await asyncio.to_thread(self._wal_tier1, rest, outcome)
                fault_point("wal")
                await asyncio.to_thread(self._chunks_tier1, rest, outcome, now_)
            else:
                await self._rest_tier2(rest, outcome)
        finally:
            lock.__exit__(None, None, None)
        labels = (self.setup.name, str(tier))
        m = self.setup.metrics
        m.backups_expired.labels(*labels).inc(len(outcome.expired))
        m.wal_pruned.labels(*labels).inc(outcome.wal)
        m.chunks_deleted.labels(*labels).inc(outcome.chunks)
        m.bytes_freed.labels(*labels).inc(outcome.bytes)
        m.refused.labels(*labels).inc(len(outcome.refused))
        m.last_run.labels(*labels).set(time.time())
        return outcome

    # -- Tier 1 ---------------------------------------------------------------------------------

    def _backups_tier1(self, outcome: Outcome) -> None:
        catalog = self.setup.catalog()
        for decision in outcome.plan.expired:
            path = catalog.manifest_path(decision.id)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue  # another run got there first
            fsio.fsync_dir(path.parent)
            shutil.rmtree(path.parent, ignore_errors=True)
            outcome.expired.append(decision.id)
            outcome.bytes += size
            self._announce_expired(decision.id, decision.reason, 1)
            log.info(
                "cluster %s: backup %s expired from tier 1: %s",
                self.setup.name,
                decision.id,
                decision.reason,
            )
        for leftover in outcome.plan.leftovers:
            directory = catalog.backup_dir(leftover)
            if not (directory / "manifest").exists() and not (directory / "lease.json").exists():
                shutil.rmtree(directory, ignore_errors=True)
                outcome.leftovers.append(leftover)
        if catalog.dir.is_dir():
            fsio.fsync_dir(catalog.dir)

    def _wal_tier1(self, rest: DeletionPlan, outcome: Outcome) -> None:
        wal_dir = self.setup.cluster_dir / "wal"
        done: list[WalEntry] = []
        groups: set[Path] = set()
        for entry in rest.wal:
            if self.stopping:
                break
            path = wal_dir / entry.name[:16] / entry.name
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            done.append(entry)
            groups.add(path.parent)
        for group in groups:
            fsio.fsync_dir(group)
            with contextlib.suppress(OSError):
                group.rmdir()  # only once empty; a group never gets old segments back
        self._account_wal(done, outcome, 1)

    def _chunks_tier1(self, rest: DeletionPlan, outcome: Outcome, now_: datetime) -> None:
        for chunk_id in rest.asides:
            # A run that died between renaming a chunk aside and deciding: put it back.
            path = self.setup.cluster_dir / chunk_path(chunk_id)
            with contextlib.suppress(FileNotFoundError):
                path.with_name(f".{chunk_id}{ASIDE}").rename(path)
        cutoff = now_.timestamp() - self.setup.chunk_grace
        catalog = self.setup.catalog()
        for index, chunk in enumerate(rest.chunks):
            if self.stopping:
                break
            if index % _LEASE_RECHECK == 0 and self._in_progress(catalog):
                log.info("cluster %s: a backup started: chunk deletion stops", self.setup.name)
                break
            path = self.setup.cluster_dir / chunk_path(chunk.id)
            size = _take_old(path, cutoff)
            if size is not None:
                outcome.chunks += 1
                outcome.bytes += size
            if index % 1000 == 999:
                fault_point("chunks")

    def _in_progress(self, catalog: BackupCatalog) -> bool:
        if not catalog.dir.is_dir():
            return False
        for entry in os.scandir(catalog.dir):
            directory = Path(entry.path)
            if entry.is_dir() and not (directory / "manifest").exists():
                return True  # a lease, or a backup about to write one
        return False

    # -- Tier 2 ---------------------------------------------------------------------------------

    async def _backups_tier2(self, outcome: Outcome) -> None:
        bucket = self.setup.bucket()
        sizes = {manifest_path(d.id): d.size for d in outcome.plan.expired}
        await asyncio.to_thread(self._tombstone, list(sizes), sizes)
        refused = await bucket.delete_many(list(sizes))
        outcome.refused.update(refused)
        for decision in outcome.plan.expired:
            if manifest_path(decision.id) in refused:
                continue
            outcome.expired.append(decision.id)
            outcome.bytes += decision.size
            await asyncio.to_thread(self._announce_expired, decision.id, decision.reason, 2)
            log.info(
                "cluster %s: backup %s expired from tier 2: %s",
                self.setup.name,
                decision.id,
                decision.reason,
            )

    async def _rest_tier2(self, rest: DeletionPlan, outcome: Outcome) -> None:
        bucket = self.setup.bucket()
        wal = {wal_path(w.name): w for w in rest.wal}
        await asyncio.to_thread(self._tombstone, list(wal), {p: w.size for p, w in wal.items()})
        refused = await bucket.delete_many(list(wal))
        outcome.refused.update(refused)
        self._account_wal([w for p, w in wal.items() if p not in refused], outcome, 2)
        fault_point("wal")
        chunks = {chunk_path(c.id): c for c in rest.chunks}
        await asyncio.to_thread(
            self._tombstone, list(chunks), {p: c.size for p, c in chunks.items()}
        )
        refused = await bucket.delete_many(list(chunks))
        outcome.refused.update(refused)
        for path, chunk in chunks.items():
            if path not in refused:
                outcome.chunks += 1
                outcome.bytes += chunk.size
        for path, why in refused.items():
            log.warning("cluster %s: %s stays in the bucket: %s", self.setup.name, path, why)

    def _tombstone(self, paths: list[str], sizes: dict[str, int]) -> None:
        """Record what is about to leave the bucket before it goes (a crash leaves it listed)."""
        if not paths:
            return
        data = b"".join(Tier2Entry(p, UNKNOWN_SHA256, sizes.get(p, 0)).line() for p in paths)
        target = self.setup.cluster_dir / TOMBSTONES
        fsio.ensure_dir(target.parent, self.setup.dir_mode)
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- announcements --------------------------------------------------------------------------

    def _system(self) -> str:
        if self._system_id is None:
            from klio_common.catalog.wal import WalArchive

            ident = WalArchive(self.setup.root, self.setup.name).read_identity()
            if ident is None:
                return SYSTEM_ID_UNKNOWN
            self._system_id = ident.system_id
        return self._system_id

    def _announce_expired(self, backup_id: str, reason: str, tier: int) -> None:
        name = self.setup.name
        self.setup.outbox.put(
            RetentionBackupExpired(
                event_id=event_id_for(name, "retention.backup.expired", str(tier), backup_id),
                occurred_at=now(),
                cluster=name,
                system_id=self._system(),
                backup_id=backup_id,
                tier=tier,
                reason=reason,
            )
        )

    def _account_wal(self, done: list[WalEntry], outcome: Outcome, tier: int) -> None:
        outcome.wal += len(done)
        outcome.bytes += sum(w.size for w in done)
        for run in wal_runs(done):
            first, last = run[0].name[:24], run[-1].name[:24]
            self.setup.outbox.put(
                RetentionWalPruned(
                    event_id=event_id_for(
                        self.setup.name, "retention.wal.pruned", str(tier), first, last
                    ),
                    occurred_at=now(),
                    cluster=self.setup.name,
                    system_id=self._system(),
                    tier=tier,
                    timeline=run[0].timeline,
                    first_segment=first,
                    last_segment=last,
                    count=len(run),
                    bytes=sum(w.size for w in run),
                )
            )
            log.info(
                "cluster %s: WAL %s..%s pruned from tier %d (%d files)",
                self.setup.name,
                first,
                last,
                tier,
                len(run),
            )


def wal_runs(entries: list[WalEntry]) -> list[list[WalEntry]]:
    """Deleted WAL grouped into runs of consecutive segments of one timeline."""
    runs: list[list[WalEntry]] = []
    for entry in sorted(entries, key=lambda w: (w.timeline, w.segno, w.partial)):
        last = runs[-1][-1] if runs else None
        if last is not None and last.timeline == entry.timeline and entry.segno - last.segno <= 1:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _take_old(path: Path, cutoff: float) -> int | None:
    """Delete a chunk file unless it was (re)written after ``cutoff``; return the bytes freed.

    The file is first renamed aside and only then checked: a backup that rewrites the chunk
    after the rename creates a new file that stays, and one that rewrote it before is seen by
    the check and put back.
    """
    aside = path.with_name(f".{path.name}{ASIDE}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None
    st = aside.stat()
    if st.st_mtime >= cutoff:
        aside.rename(path)  # the same content by its name, whichever file is there
        return None
    aside.unlink()
    return st.st_size
