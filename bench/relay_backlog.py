"""The relay benchmarks' backlog: a Tier-1 directory filled as the services fill it.

`fill` writes WAL segments and one committed backup's chunks, encrypted and compressed as the
receiver and the basebackup service store them, into the cluster `CLUSTER`, and returns their
paths with the events that announce them; `evict` drops them from the page cache before each
upload. Used by `bench.relay_throughput`.
"""

from __future__ import annotations

import os
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.lab import SEGMENT, Lab
from klio_common import compression
from klio_common.catalog.backups import BackupCatalog, BackupManifest, FileEntry
from klio_common.catalog.chunks import DEFAULT_CHUNK_SIZE, ChunkStore
from klio_common.catalog.wal import StoredObject, WalArchive
from klio_common.crypto import KeyRing
from klio_common.events import BackupDone, Event, WalSegmentClosed
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_common.storage.layout import kind_of

CLUSTER = "tput"  # not the lab's "main": its events must not mix with the other benchmarks'


def fill(lab: Lab, cluster_dir: Path, total: int) -> tuple[list[str], list[Event]]:
    """Write segments and one backup's chunks (zstd-3 + AES-256-GCM, incompressible data).

    Returns:
        The objects' paths, and the events that announce them (a ``wal.segment.closed`` per
        segment, then the backup's ``backup.done``), as the services would publish them.
    """
    keyring = KeyRing.load("k1", {"k1": lab.key_file})
    codec = compression.get("zstd", 3)
    archive = WalArchive(cluster_dir.parent, CLUSTER)
    archive.ensure_identity(lab.pg.system_identifier(), SEGMENT, 150000, int(time.time()))
    count = max(2, round(total * 0.75 / SEGMENT))
    first = WalSegment(1, 0x100, SEGMENT)
    segments = [WalSegment(1, first.segno + i, SEGMENT) for i in range(count)]
    names = [seg.name for seg in segments]
    system_id = str(lab.pg.system_identifier())
    events: list[Event] = []
    for seg in segments:
        stored = archive.store_segment(
            seg.name, secrets.token_bytes(SEGMENT), codec=codec, keyring=keyring
        )
        events.append(_closed_event(seg, stored, archive, system_id))
    store = ChunkStore(cluster_dir, keyring, codec)
    chunks = []
    for _ in range(max(1, (total - count * SEGMENT) // DEFAULT_CHUNK_SIZE)):
        piece = secrets.token_bytes(DEFAULT_CHUNK_SIZE)
        chunk_id = store.chunk_id(piece)
        store.put(chunk_id, piece)
        chunks.append(chunk_id)
    store.sync()
    started = datetime.now(UTC)
    catalog = BackupCatalog(cluster_dir, keyring, codec)
    size = len(chunks) * DEFAULT_CHUNK_SIZE
    manifest = BackupManifest(
        id="20260101T000000Z",
        cluster=CLUSTER,
        system_id=str(lab.pg.system_identifier()),
        pg_version=150000,
        timeline=1,
        start_lsn=str(Lsn(first.start_lsn)),
        end_lsn=str(Lsn(first.start_lsn + SEGMENT)),
        start_time=started,
        end_time=started + timedelta(seconds=1),
        label="bench",
        chunk_size=DEFAULT_CHUNK_SIZE,
        compression="zstd",
        key_id="k1",
        size=size,
        stored_size=size,
        new_chunk_bytes=size,
        chunks_total=len(chunks),
        chunks_new=len(chunks),
        wal_start_segment=names[0],
        wal_end_segment=names[-1],
        files=[FileEntry(path="base/1/16384", size=size, chunks=chunks)],
    )
    catalog.commit(manifest)
    events.append(
        BackupDone(
            event_id=f"bench-{manifest.id}",
            occurred_at=datetime.now(UTC),
            cluster=CLUSTER,
            system_id=system_id,
            backup_id=manifest.id,
            timeline=1,
            start_lsn=manifest.start_lsn,
            end_lsn=manifest.end_lsn,
            start_time=manifest.start_time,
            end_time=manifest.end_time,
            size=size,
            stored_size=size,
            new_chunk_bytes=size,
            chunks_total=len(chunks),
            chunks_new=len(chunks),
        )
    )
    paths = sorted(
        p.relative_to(cluster_dir).as_posix()
        for p in cluster_dir.rglob("*")
        if p.is_file() and kind_of(p.relative_to(cluster_dir).as_posix()) is not None
    )
    return paths, events


def _closed_event(
    seg: WalSegment, stored: StoredObject, archive: WalArchive, system_id: str
) -> WalSegmentClosed:
    h = stored.header
    return WalSegmentClosed(
        event_id=f"bench-{seg.name}",
        occurred_at=datetime.now(UTC),
        cluster=CLUSTER,
        system_id=system_id,
        segment=seg.name,
        timeline=seg.timeline,
        start_lsn=str(Lsn(seg.start_lsn)),
        end_lsn=str(Lsn(seg.end_lsn)),
        size=h.plaintext_size or 0,
        stored_size=stored.stored_size,
        sha256=h.plaintext_sha256 or "",
        key_id=h.key_id,
        compression=h.codec,
        path=archive.relative(stored.path),
    )


def evict(cluster_dir: Path, paths: list[str]) -> None:
    """Drop the objects from the page cache: every variant reads them from the device.

    A backlog (after an outage, or a relay started on a full Tier 1) is not in the cache, and
    the receiver writes closed segments around it (`fsio.write_direct`): without this, whichever
    variant ran first paid for reading what the others then found cached.
    """
    for rel in paths:
        fd = os.open(cluster_dir / rel, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
