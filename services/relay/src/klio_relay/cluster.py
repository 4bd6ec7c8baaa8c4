"""One cluster's relay: WAL files and whole backups to the bucket, announced, journaled, alerted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from klio_common.catalog.backups import BackupCatalog, BackupManifest
from klio_common.catalog.wal import WalArchive
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.errors import ConflictError, CorruptObject, KlioError, Permanent, Retryable
from klio_common.events import DeadLetter, Event, Tier2BackupRelayed, Tier2WalRelayed, now
from klio_common.events.base import SYSTEM_ID_UNKNOWN
from klio_common.events.codec import event_id_for
from klio_common.events.subjects import subject
from klio_common.pg.walname import WalSegment, history_name
from klio_common.runtime.outbox import Outbox
from klio_common.runtime.settings import Tier1Settings
from klio_common.storage.layout import (
    DEDUP_KEY,
    IDENTITY,
    BucketLayout,
    chunk_path,
    kind_of,
    manifest_path,
    wal_path,
)
from klio_common.storage.s3 import S3Store
from klio_common.storage.tier2state import UNKNOWN_SHA256, Tier2Entry, Tier2State
from klio_relay.probe import BucketProbe
from klio_relay.state import Lag, RelayMetrics
from klio_relay.upload import Relayed, SingleFlight, Uploader
from klio_relay.window import Window

log = logging.getLogger("klio.relay")
SERVICE = "relay"

Origin = Literal["event", "reconcile"]
"""Who asked: an event (the bus reports a permanent failure) or reconciliation (we alert)."""


@dataclass
class _Counts:
    uploaded: int = 0
    skipped: int = 0
    bytes: int = 0


class ClusterRelay:
    """Relays one cluster's Tier-1 directory to its prefix in the bucket.

    Every object goes up verified, then its announcement goes to the outbox, then the Tier-2
    journal records it: a crash in between repeats an idempotent step, never skips one.

    Args:
        cluster: the cluster name.
        tier1: the Tier-1 settings.
        keyring: keys to open the objects (and manifests).
        codec: the configured codec (the catalog needs one; the relay writes no object).
        store: the bucket.
        prefix: ``tier2.s3.prefix``.
        metrics: the relay's metrics.
        probe: the bucket's state.
        slots: bounds the uploads in flight across the relay.
        window: objects scheduled at once within a backup (the slots bound the uploads).
        multipart_threshold: objects above this go up in parts.
        stop: set when the relay is stopping (a long backup gives up between batches).
    """

    def __init__(
        self,
        cluster: str,
        tier1: Tier1Settings,
        keyring: KeyRing,
        codec: Codec,
        store: S3Store,
        prefix: str,
        metrics: RelayMetrics,
        probe: BucketProbe,
        slots: asyncio.Semaphore,
        window: int,
        multipart_threshold: int,
        stop: asyncio.Event,
    ) -> None:
        modes = {"file_mode": tier1.file_mode, "dir_mode": tier1.dir_mode}
        self.cluster = cluster
        self.cluster_dir = tier1.path / cluster
        self.archive = WalArchive(tier1.path, cluster, **modes)
        self.catalog = BackupCatalog(self.cluster_dir, keyring, codec, **modes)
        self.state = Tier2State(self.cluster_dir, **modes)
        self.outbox = Outbox(self.cluster_dir / "outbox" / "relay", **modes)
        self.outbox_wake = asyncio.Event()
        self.store = store
        self.layout = BucketLayout.of(prefix, cluster)
        self.metrics = metrics
        self.lag = Lag(cluster, metrics)
        self.uploader = Uploader(
            store, self.layout, self.cluster_dir, keyring, metrics, probe, slots,
            multipart_threshold,
        )  # fmt: skip
        self.window = window
        self.stop = stop
        self.failed: dict[str, str] = {}  # path → why it last failed for good
        self._alerted: dict[str, str] = {}
        self._backups: SingleFlight[bool] = SingleFlight()
        self._system_id: str | None = None

    # -- start --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Load the Tier-2 journal, or rebuild it from a listing of the bucket when it is lost.

        Listed objects still on Tier 1 are only noted: each is checked by HEAD against Tier 1
        before it is trusted. Listed objects gone from Tier 1 are taken as they are.
        """
        if self.state.exists:
            count = await asyncio.to_thread(self.state.load)
            log.info("cluster %s: %d objects recorded on Tier 2", self.cluster, count)
            return
        entries: list[Tier2Entry] = []
        listed: set[str] = set()
        async for info in self.store.list(self.layout.cluster_prefix):
            path = self.layout.relative(info.key)
            if kind_of(path) is None:
                continue
            if (self.cluster_dir / path).exists():
                listed.add(path)
            else:
                entries.append(Tier2Entry(path, UNKNOWN_SHA256, info.size))
        await asyncio.to_thread(self.state.rebuild, entries)
        self.uploader.listed = listed
        log.info(
            "cluster %s: Tier-2 journal rebuilt from the bucket (%d objects, %d to check)",
            self.cluster,
            len(entries),
            len(listed),
        )

    # -- WAL ----------------------------------------------------------------------------------

    async def wal_file(
        self, name: str, *, origin: Origin, size: int | None = None, since: float | None = None
    ) -> bool:
        """Relay a WAL segment, closed partial or history file, then announce it.

        Args:
            name: its PostgreSQL name.
            origin: who asked (see `Origin`).
            size: stored bytes, for the lag (read from the file when None).
            since: when it reached Tier 1, for the lag (the file's mtime when None).

        Returns:
            True when it was relayed now, False when the journal already had it.
        """
        path = wal_path(name)
        if path in self.state:
            self.lag.done(path)
            return False
        if size is None or since is None:
            try:
                stat = (self.cluster_dir / path).stat()
                size, since = stat.st_size, stat.st_mtime
            except FileNotFoundError:
                size, since = 0, now().timestamp()
        self.lag.add(path, size, since, wal=True)
        try:
            relayed = await self.uploader.relay(path, head_first=path in self.failed)
        except Permanent as exc:
            await self._failed(path, exc, origin, "wal.segment.closed")
            raise
        header = relayed.header
        assert header is not None and header.plaintext_sha256 is not None
        sha256 = header.plaintext_sha256
        await self._announce(
            Tier2WalRelayed(
                event_id=event_id_for(self.cluster, "tier2.wal.relayed", name, sha256),
                occurred_at=now(),
                cluster=self.cluster,
                system_id=await self._identity(),
                segment=name,
                key=relayed.key,
                sha256=sha256,
                size=header.plaintext_size or 0,
            )
        )
        await asyncio.to_thread(self.state.record, [relayed.entry])
        self.lag.done(path)
        self.failed.pop(path, None)
        return True

    # -- backups ------------------------------------------------------------------------------

    async def backup(self, backup_id: str, *, origin: Origin) -> bool:
        """Relay a committed backup: missing chunks, its WAL range, then its metadata, last.

        Returns:
            True when it was relayed now, False when the journal already had it.
        """
        return await self._backups.run(backup_id, lambda: self._backup(backup_id, origin))

    async def _backup(self, backup_id: str, origin: Origin) -> bool:
        lag_key = f"backup:{backup_id}"
        target = manifest_path(backup_id)
        if target in self.state:
            self.lag.done(lag_key)
            return False
        try:
            manifest = await asyncio.to_thread(self.catalog.load, backup_id)
            self.lag.add(
                lag_key, manifest.new_chunk_bytes, manifest.end_time.timestamp(), wal=False
            )
            counts = _Counts()
            chunk_ids = list(dict.fromkeys(c for f in manifest.files for c in f.chunks))
            missing = [chunk_path(c) for c in chunk_ids if chunk_path(c) not in self.state]
            counts.skipped += len(chunk_ids) - len(missing)
            await self._relay_many(missing, counts)
            await self._wal_range(manifest, origin)
            # The metadata goes last: a backup the bucket lists is a backup it can restore.
            meta = [IDENTITY, DEDUP_KEY] if (self.cluster_dir / DEDUP_KEY).exists() else [IDENTITY]
            await self._relay_many([p for p in meta if p not in self.state], counts)
            relayed = await self.uploader.relay(target, head_first=target in self.failed)
        except Permanent as exc:
            await self._failed(lag_key, exc, origin, "backup.done")
            raise
        counts.uploaded += relayed.uploaded
        counts.skipped += not relayed.uploaded
        counts.bytes += relayed.entry.size if relayed.uploaded else 0
        await self._announce(
            Tier2BackupRelayed(
                event_id=event_id_for(self.cluster, "tier2.backup.relayed", backup_id),
                occurred_at=now(),
                cluster=self.cluster,
                system_id=manifest.system_id,
                backup_id=backup_id,
                objects_uploaded=counts.uploaded,
                objects_skipped=counts.skipped,
                bytes_uploaded=counts.bytes,
            )
        )
        await asyncio.to_thread(self.state.record, [relayed.entry])
        self.lag.done(lag_key)
        self.failed.pop(lag_key, None)
        log.info(
            "cluster %s: backup %s is in the bucket (%d objects sent, %d already there)",
            self.cluster,
            backup_id,
            counts.uploaded,
            counts.skipped,
            extra={"cluster": self.cluster, "backup_id": backup_id},
        )
        return True

    async def _wal_range(self, manifest: BackupManifest, origin: Origin) -> None:
        names = await asyncio.to_thread(self._wal_names, manifest)
        names = [n for n in names if wal_path(n) not in self.state]
        window: Window[str, bool] = Window(
            lambda n: self.wal_file(n, origin=origin), self.window, _settled, self._check_stop
        )
        _raise_first(await window.run(names))

    def _wal_names(self, manifest: BackupManifest) -> list[str]:
        seg_size = self.archive.segment_size()
        first = WalSegment.parse(manifest.wal_start_segment, seg_size)
        last = WalSegment.parse(manifest.wal_end_segment, seg_size)
        names = [
            WalSegment(manifest.timeline, segno, seg_size).name
            for segno in range(first.segno, last.segno + 1)
        ]
        # Restoring onto the backup's timeline needs its history (and so its ancestors').
        names += [history_name(t) for t in self.archive.list_history() if t <= manifest.timeline]
        return names

    async def _relay_many(self, paths: Sequence[str], counts: _Counts) -> None:
        async def settle(group: list[tuple[str, Relayed | BaseException]]) -> None:
            done = [r for _, r in group if isinstance(r, Relayed)]
            if done:
                await asyncio.to_thread(self.state.record, [r.entry for r in done])
            for relayed in done:
                counts.uploaded += relayed.uploaded
                counts.skipped += not relayed.uploaded
                counts.bytes += relayed.entry.size if relayed.uploaded else 0
            for path, result in group:
                if isinstance(result, Permanent):
                    self.failed[path] = result.message

        def work(path: str) -> Awaitable[Relayed]:
            return self.uploader.relay(path, head_first=path in self.failed)

        _raise_first(await Window(work, self.window, settle, self._check_stop).run(paths))

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Retryable("the relay is stopping; the rest follows after its restart")

    # -- announcements and alerts ---------------------------------------------------------------

    async def _identity(self) -> str:
        if self._system_id is None:
            ident = await asyncio.to_thread(self.archive.read_identity)
            if ident is None:
                return SYSTEM_ID_UNKNOWN
            self._system_id = ident.system_id
        return self._system_id

    async def _announce(self, event: Event) -> None:
        await asyncio.to_thread(self.outbox.put, event)
        self.outbox_wake.set()

    async def _failed(self, what: str, exc: Permanent, origin: Origin, tag: str) -> None:
        """Count and report a permanent failure once per distinct reason."""
        self.failed[what] = exc.message
        if self._alerted.get(what) == exc.message:
            return
        self._alerted[what] = exc.message
        if isinstance(exc, CorruptObject):
            self.metrics.corrupt.inc()
        elif isinstance(exc, ConflictError):
            self.metrics.conflicts.inc()
        log.error(
            "cluster %s: %s is not relayed: %s",
            self.cluster,
            what,
            exc.message,
            extra={"cluster": self.cluster, "hint": exc.hint},
        )
        if origin == "event":
            return  # the bus terminates the message and publishes its dead letter
        letter = DeadLetter(
            event_id=event_id_for("deadletter", SERVICE, self.cluster, what, exc.message),
            occurred_at=now(),
            cluster=self.cluster,
            system_id=await self._identity(),
            service=f"klio-{SERVICE}",
            subject=subject(self.cluster, tag),
            reason=exc.message,
            payload=msgspec.json.encode({"path": what, "found_by": "reconcile"}).decode(),
        )
        await self._announce(letter)


async def _settled(group: object) -> None:
    """Nothing to do per group: each WAL file journals and announces itself."""


def _raise_first(errors: Sequence[BaseException]) -> None:
    """Raise the most telling error: a permanent one first, else a bucket problem, else any."""
    for kind in (Permanent, KlioError, BaseException):
        for error in errors:
            if isinstance(error, kind):
                raise error
