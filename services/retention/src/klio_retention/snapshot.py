"""What one tier holds for one cluster, as the planner sees it; built from Tier 1 or the bucket."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from klio_common.catalog.backups import BackupCatalog, BackupManifest
from klio_common.catalog.chunks import ChunkStore
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.errors import KlioError
from klio_common.pg.lsn import Lsn
from klio_common.pg.timeline import TimelineHistory
from klio_common.pg.walname import is_partial_name, is_segment_name
from klio_common.storage.layout import chunk_path, manifest_path, wal_path
from klio_common.storage.tier2state import Tier2State

ASIDE = ".tmp-retention"
"""Suffix of a chunk retention renamed aside while it decides (``.<id>.tmp-retention``)."""


@dataclass(frozen=True)
class BackupEntry:
    """A committed backup on one tier.

    Attributes:
        id: the backup id.
        timeline: the timeline it was taken on.
        start_lsn: where its WAL chain starts (as a number).
        end_lsn: where it becomes consistent.
        end_time: when it ended: backups are ordered by this, never by id or timeline.
        chunks: the chunk ids it references.
        size: stored bytes of its manifest (what deleting the backup itself frees).
        relayed: Tier 1 only: its manifest is on Tier 2 (always True without Tier 2).
        locked: why it cannot be deleted yet (object lock), None when it can.
    """

    id: str
    timeline: int
    start_lsn: int
    end_lsn: int
    end_time: datetime
    chunks: frozenset[str]
    size: int
    relayed: bool = True
    locked: str | None = None


@dataclass(frozen=True)
class WalEntry:
    """A complete segment or closed ``.partial`` (history files are never deleted)."""

    name: str
    timeline: int
    segno: int
    partial: bool
    size: int
    relayed: bool = True
    locked: str | None = None


@dataclass(frozen=True)
class ChunkEntry:
    """A chunk file or object; ``mtime`` is when it was written (Unix seconds)."""

    id: str
    size: int
    mtime: float
    relayed: bool = True
    locked: str | None = None


@dataclass
class Snapshot:
    """One tier of one cluster at one moment: the planner's only input besides time and policy.

    Attributes:
        tier: 1 (the volume) or 2 (the bucket).
        cluster: the cluster name.
        seg_size: the WAL segment size.
        backups: committed backups (any order).
        wal: segments and closed partials.
        histories: parsed history files by timeline (every one is kept).
        chunks: chunk files or objects.
        in_progress: ids of backups that have started and not committed (leases, or directories
            without a manifest that are too young to be a crash's leftovers).
        leftovers: directories of backups that crashed or were half deleted (removable).
        tier2: Tier 1 only: a Tier 2 is configured, so unrelayed data is held.
        protected_chunks: Tier 2 only: chunks Tier-1 backups reference (the relay may still
            send a backup that needs them).
        asides: Tier 1 only: chunks a crashed run left renamed aside (to be put back).
    """

    tier: int
    cluster: str
    seg_size: int
    backups: list[BackupEntry] = field(default_factory=list)
    wal: list[WalEntry] = field(default_factory=list)
    histories: dict[int, TimelineHistory] = field(default_factory=dict)
    chunks: list[ChunkEntry] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    tier2: bool = False
    protected_chunks: frozenset[str] = frozenset()
    asides: list[str] = field(default_factory=list)

    def with_locks(self, locks: dict[str, str]) -> Snapshot:
        """A copy where the objects named in ``locks`` (relative path → why) are locked."""
        if not locks:
            return self
        return replace(
            self,
            backups=[_lock(b, locks.get(manifest_path(b.id))) for b in self.backups],
            wal=[_lock(w, locks.get(wal_path(w.name))) for w in self.wal],
            chunks=[_lock(c, locks.get(chunk_path(c.id))) for c in self.chunks],
        )


_E = TypeVar("_E", BackupEntry, WalEntry, ChunkEntry)


def _lock(entry: _E, why: str | None) -> _E:
    return entry if why is None else replace(entry, locked=why)


def backup_entry(
    manifest: BackupManifest, size: int, *, relayed: bool = True, locked: str | None = None
) -> BackupEntry:
    """The planner's view of a manifest."""
    return BackupEntry(
        id=manifest.id,
        timeline=manifest.timeline,
        start_lsn=int(Lsn.parse(manifest.start_lsn)),
        end_lsn=int(Lsn.parse(manifest.end_lsn)),
        end_time=manifest.end_time,
        chunks=frozenset(c for f in manifest.files for c in f.chunks),
        size=size,
        relayed=relayed,
        locked=locked,
    )


def wal_entry(name: str, seg_size: int, size: int, *, relayed: bool = True) -> WalEntry:
    """Parse a segment or closed partial name into numbers (no string comparisons later)."""
    per_id = 0x100000000 // seg_size
    segno = int(name[8:16], 16) * per_id + int(name[16:24], 16)
    return WalEntry(name, int(name[:8], 16), segno, name.endswith(".partial"), size, relayed)


def is_wal_file(name: str) -> bool:
    """A segment or closed partial: what WAL retention may delete."""
    return is_segment_name(name) or is_partial_name(name)


# -- Tier 1 -------------------------------------------------------------------------------------


def tier1_snapshot(
    root: Path,
    cluster: str,
    keyring: KeyRing,
    catalog: BackupCatalog,
    *,
    tier2: bool,
    young_after: float,
) -> Snapshot:
    """Read one cluster's Tier-1 catalog.

    Args:
        root: ``tier1.path``.
        cluster: the cluster.
        keyring: keys (manifests and history files are encrypted).
        catalog: the cluster's backup catalog.
        tier2: whether a Tier 2 is configured (then the relay's journal says what is relayed).
        young_after: a backup directory without manifest or lease modified after this Unix
            time is taken as a backup starting, not as a crash's leftover.
    """
    archive = WalArchive(root, cluster)
    ident = archive.read_identity()
    if ident is None:
        return Snapshot(tier=1, cluster=cluster, seg_size=16 << 20)
    seg_size = ident.wal_segment_size
    state = Tier2State(archive.cluster_dir)
    if tier2:
        state.load()
    snap = Snapshot(tier=1, cluster=cluster, seg_size=seg_size, tier2=tier2)
    for name, path in archive.iter_segment_files():
        size = _size(path)
        if size is not None:
            snap.wal.append(wal_entry(name, seg_size, size, relayed=wal_path(name) in state))
    for tli in archive.list_history():
        try:
            snap.histories[tli] = archive.read_history(tli, keyring)
        except (KlioError, ValueError, UnicodeDecodeError):
            continue  # unknown ancestry: the planner then deletes on this timeline only
    _tier1_backups(snap, catalog, state, young_after)
    store = ChunkStore(archive.cluster_dir, keyring, catalog.codec, read_only=True)
    snap.chunks = list(chunk_files(store.dir, state, snap.asides))
    return snap


def _tier1_backups(
    snap: Snapshot, catalog: BackupCatalog, state: Tier2State, young_after: float
) -> None:
    if not catalog.dir.is_dir():
        return
    for entry in os.scandir(catalog.dir):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        directory = Path(entry.path)
        size = _size(directory / "manifest")
        if size is not None:
            manifest = catalog.load(entry.name)
            relayed = manifest_path(entry.name) in state
            snap.backups.append(backup_entry(manifest, size, relayed=relayed))
        elif (directory / "lease.json").exists():
            snap.in_progress.append(entry.name)
        else:
            mtime = _mtime(directory)
            if mtime is None:
                continue
            (snap.in_progress if mtime > young_after else snap.leftovers).append(entry.name)
    snap.in_progress.sort()
    snap.leftovers.sort()


def chunk_files(
    directory: Path, state: Tier2State | None = None, asides: list[str] | None = None
) -> Iterable[ChunkEntry]:
    """Every chunk file under ``chunks/`` with its size and modification time.

    Args:
        directory: the ``chunks/`` directory.
        state: the Tier-2 journal (what is relayed); None counts everything as relayed.
        asides: filled with the ids of chunks a crashed run left renamed aside.
    """
    if not directory.is_dir():
        return
    for a in os.scandir(directory):
        if not a.is_dir() or len(a.name) != 2:
            continue
        for c in os.scandir(a.path):
            if c.name.startswith("."):
                if asides is not None and c.name.endswith(ASIDE):
                    asides.append(c.name[1 : -len(ASIDE)])
                continue  # temp files of writers
            try:
                relayed = state is None or chunk_path(c.name) in state
                st = c.stat()
            except (ValueError, FileNotFoundError):
                continue  # not a chunk (never ours to delete), or gone meanwhile
            yield ChunkEntry(c.name, st.st_size, st.st_mtime, relayed)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None
