"""Tier 2 under object lock: what cannot be deleted yet is reported as held, and the run goes on."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from klio_common import compression
from klio_common.catalog.backups import BackupCatalog, BackupManifest, FileEntry
from klio_common.catalog.chunks import ChunkStore
from klio_common.catalog.wal import WalArchive
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_common.runtime.settings import Settings
from klio_common.storage.layout import manifest_path, wal_path
from klio_common.storage.tier2state import Tier2State
from klio_dev import S3Server
from klio_dev.waiting import wait_until
from tests.fixtures.paths import KlioConfigWriter
from tests.relay.helpers import keyring_of, load, relay_inprocess
from tests.retention.helpers import retention

pytestmark = pytest.mark.integration
LOCKED = "klio-locked"
SEG = 1 << 20
NOW = datetime.now(UTC)


def build_tier1(settings: Settings) -> list[str]:
    """A cluster on Tier 1 without PostgreSQL: 1 MiB segments 1..8, backups at 2, 4 and 6."""
    assert settings.tier1 is not None
    keyring = keyring_of(settings)
    codec = compression.get("zstd", 3)
    archive = WalArchive(settings.tier1.path, "main")
    archive.ensure_identity(7400000000000000001, SEG, 150000, int(NOW.timestamp()))
    for segno in range(1, 9):
        name = WalSegment(1, segno, SEG).name
        archive.store_segment(name, bytes(SEG), codec=codec, keyring=keyring)
    catalog = BackupCatalog(archive.cluster_dir, keyring, codec)
    store = ChunkStore(archive.cluster_dir, keyring, codec)
    shared = secrets.token_bytes(1000)
    ids = []
    for n, segno in enumerate((2, 4, 6), start=1):
        backup_id = f"2026010{n}T000000Z"
        files = {"global/pg_control": shared, "base/1/1": secrets.token_bytes(5000)}
        entries = []
        for path, data in files.items():
            chunk = store.chunk_id(data)
            store.put(chunk, data)
            entries.append(
                FileEntry(
                    path=path,
                    size=len(data),
                    chunks=[chunk],
                    sha256=hashlib.sha256(data).hexdigest(),
                )
            )
        store.sync()
        catalog.begin(backup_id)
        ended = NOW - timedelta(days=10 - n)
        catalog.commit(
            BackupManifest(
                id=backup_id,
                cluster="main",
                system_id="7400000000000000001",
                pg_version=150000,
                timeline=1,
                start_lsn=str(Lsn(segno * SEG + 40)),
                end_lsn=str(Lsn(segno * SEG + 4000)),
                start_time=ended - timedelta(seconds=5),
                end_time=ended,
                label=backup_id,
                chunk_size=131072,
                compression="zstd",
                key_id=keyring.active,
                size=6000,
                stored_size=0,
                new_chunk_bytes=0,
                chunks_total=2,
                chunks_new=2,
                wal_start_segment=WalSegment(1, segno, SEG).name,
                wal_end_segment=WalSegment(1, segno, SEG).name,
                files=entries,
            )
        )
        ids.append(backup_id)
    return ids


def test_locked_objects_are_held_and_reported(
    nats_server: Any,
    s3_server: S3Server,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket=LOCKED, ObjectLockEnabledForBucket=True)
    cluster = {
        "name": "main",
        "conninfo": "host=/nonexistent",
        "retention": {"tier2": "REDUNDANCY 1"},
    }
    config = klio_config(
        nats=nats_server,
        tier1=tier1_dir,
        s3=s3_server,
        bucket=LOCKED,
        keys=keyring_files,
        extra={"clusters": [cluster], "retention": {"chunk_grace": 0}},
    )
    settings = load(config)
    b1, b2, b3 = build_tier1(settings)
    journal = Tier2State(tier1_dir / "main")

    def relayed() -> bool:
        journal.load()
        return all(manifest_path(b) in journal for b in (b1, b2, b3))

    with relay_inprocess(settings):
        wait_until(relayed, 120, "the three backups in the bucket")
    first_wal = wal_path(WalSegment(1, 1, SEG).name)
    until = NOW + timedelta(days=1)
    client.put_object_retention(
        Bucket=LOCKED,
        Key=f"main/{manifest_path(b1)}",
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until},
    )
    client.put_object_legal_hold(Bucket=LOCKED, Key=f"main/{first_wal}", LegalHold={"Status": "ON"})

    [doc] = retention(config, "plan", "--tier", "2")
    fates = {b["id"]: (b["action"], b["reason"]) for b in doc["backups"]}
    assert fates[b1][0] == "hold" and "object lock (GOVERNANCE)" in fates[b1][1], fates
    assert fates[b2] == ("expire", "beyond REDUNDANCY 1"), fates
    assert fates[b3][0] == "keep", fates
    assert {"path": first_wal, "reason": "under an object lock legal hold"} in doc["held"]
    assert doc["wal"]["count"] == 0  # the locked first segment holds the ones after it

    [done] = retention(config, "apply", "--tier", "2")
    assert done["expired"] == [b2]
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=LOCKED)["Contents"]}
    assert f"main/{manifest_path(b1)}" in listed
    assert f"main/{manifest_path(b2)}" not in listed
    assert f"main/{manifest_path(b3)}" in listed
    assert f"main/{first_wal}" in listed
    # Every chunk stays: b1 is held, and Tier 1 still keeps b2 (the relay may need its chunks).
    chunk_keys = {k for k in listed if "/chunks/" in k and not k.endswith("dedup.key")}
    assert len(chunk_keys) == 4
    assert done["chunks_deleted"] == 0
    tombstones = (tier1_dir / "main" / "tier2" / "deleted").read_text()
    assert manifest_path(b2) in tombstones
