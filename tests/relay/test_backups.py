"""Backups to the bucket: chunks, WAL range and metadata last; only new chunks the second time."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from klio_common.catalog.backups import BackupManifest
from klio_common.storage.layout import DEDUP_KEY, IDENTITY, chunk_path, manifest_path, wal_path
from klio_dev.waiting import wait_until
from tests.fixtures.paths import BUCKET, KlioConfigWriter
from tests.relay.helpers import (
    CHUNK,
    announce_backup,
    assert_bucket_mirrors,
    bucket_objects,
    cluster_dir,
    load,
    make_backup,
    relay_inprocess,
    sample,
    stream_events,
    wait_in_bucket,
)
from tests.wal_receiver.helpers import archive_of, close_segment, receiver_inprocess

pytestmark = pytest.mark.integration
BACKUP_RELAYED = "klio.main.tier2.backup.relayed"


def _some_wal(pg: Any, settings: Any, switches: int = 3) -> tuple[str, str]:
    """Write and close a few segments; return the first and last complete segment names."""
    pg.execute("CREATE TABLE IF NOT EXISTS t (x int)")
    for _ in range(switches):
        pg.execute("INSERT INTO t SELECT generate_series(1, 1000)")
        close_segment(pg, settings)
    segments = archive_of(settings).list_segments()
    return segments[0].name, segments[-1].name


def _relayed(nats_url: str, backup_id: str) -> dict[str, Any] | None:
    for event in stream_events(nats_url, BACKUP_RELAYED):
        if event["backup_id"] == backup_id:
            return event
    return None


@pytest.mark.parametrize("encrypted", [True, False], ids=["zstd+aes", "plain"])
def test_backups_reach_the_bucket_metadata_last_and_incrementally(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    encrypted: bool,
) -> None:
    config = klio_config(
        pg=pg,
        nats=nats_server,
        tier1=tier1_dir,
        s3=s3_server,
        keys=keyring_files if encrypted else None,
        compression="zstd" if encrypted else "none",
        extra={"relay": {"reconcile_interval": 60}},
    )
    settings = load(config)
    files = {
        "base/5/16384": secrets.token_bytes(8 * CHUNK),
        "base/5/16385": secrets.token_bytes(3 * CHUNK + 100),
        "global/pg_control": secrets.token_bytes(8192),
    }
    with receiver_inprocess(settings), relay_inprocess(settings):
        first, last = _some_wal(pg, settings)
        one = make_backup(settings, "20260101T000000Z", files, first, last)
        announce_backup(nats_server.url, one)
        wait_until(lambda: _relayed(nats_server.url, one.id), 120, "backup one relayed")

        # Backup one is complete in the bucket: chunks, its WAL range, identity, metadata.
        chunks = {chunk_path(c) for f in one.files for c in f.chunks}
        assert len(chunks) == 13
        wal = {wal_path(s.name) for s in archive_of(settings).list_segments()}
        metadata = {IDENTITY, manifest_path(one.id)} | ({DEDUP_KEY} if encrypted else set())
        objects = bucket_objects(s3_server)
        assert {f"main/{p}" for p in chunks | wal | metadata} <= set(objects)
        assert_bucket_mirrors(s3_server, settings, chunks | wal | metadata, "main/")
        manifest_time = _modified(s3_server, f"main/{manifest_path(one.id)}")
        for path in chunks | wal:
            assert _modified(s3_server, f"main/{path}") <= manifest_time, path
        event = _relayed(nats_server.url, one.id)
        assert event is not None
        assert event["objects_uploaded"] == len(chunks) + len(metadata)
        assert event["objects_skipped"] == 0

        # Wait for every WAL upload to settle, so that what follows counts backup two only.
        wait_in_bucket(s3_server, {f"main/{p}" for p in wal})
        wait_until(lambda: sample("klio_relay_lag_segments", cluster="main") == 0, 30, "no lag")
        puts_before = sample("klio_relay_requests_total", op="put")
        heads_before = sample("klio_relay_requests_total", op="head")
        keys_before = set(bucket_objects(s3_server))

        changed = bytearray(files["base/5/16384"])
        changed[3 * CHUNK + 10 : 3 * CHUNK + 20] = secrets.token_bytes(10)  # one page changes
        files2 = {
            **files,
            "base/5/16384": bytes(changed),
            "base/5/16386": secrets.token_bytes(CHUNK),
        }
        two = make_backup(settings, "20260102T000000Z", files2, first, last)
        announce_backup(nats_server.url, two)
        wait_until(lambda: _relayed(nats_server.url, two.id), 120, "backup two relayed")
        puts = sample("klio_relay_requests_total", op="put") - puts_before
        heads = sample("klio_relay_requests_total", op="head") - heads_before
        new_keys = set(bucket_objects(s3_server)) - keys_before

    new_chunks = {chunk_path(c) for f in two.files for c in f.chunks} - chunks
    assert len(new_chunks) == 2
    assert new_keys == {f"main/{p}" for p in new_chunks | {manifest_path(two.id)}}
    assert puts == len(new_keys) == 3  # two chunks and the manifest: nothing sent twice
    assert heads == 0  # each PUT's ETag (the server's MD5 of what it stored) verified it
    event = _relayed(nats_server.url, two.id)
    assert event is not None
    assert (event["objects_uploaded"], event["objects_skipped"]) == (3, 12)


def test_a_backup_with_a_corrupt_chunk_never_lists_in_the_bucket(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, s3=s3_server, keys=keyring_files)
    settings = load(config)
    corrupt_before = sample("klio_relay_corrupt_objects_total")
    with receiver_inprocess(settings), relay_inprocess(settings):
        first, last = _some_wal(pg, settings, switches=1)
        files = {"base/5/1": secrets.token_bytes(4 * CHUNK)}

        def damage(manifest: BackupManifest) -> None:
            # Before the commit: a reconciliation pass must not relay the chunk still intact.
            target = cluster_dir(settings) / chunk_path(manifest.files[0].chunks[2])
            data = bytearray(target.read_bytes())
            data[-5] ^= 0xFF  # inside the last frame's ciphertext
            target.write_bytes(bytes(data))

        backup = make_backup(settings, "20260103T000000Z", files, first, last, before_commit=damage)
        bad = chunk_path(backup.files[0].chunks[2])
        announce_backup(nats_server.url, backup)
        wait_until(
            lambda: any(
                backup.id in (d["payload"] + d["reason"]) or bad.rsplit("/", 1)[1] in d["reason"]
                for d in stream_events(nats_server.url, "klio.main.deadletter")
            ),
            120,
            "a dead letter for the backup",
        )
        assert sample("klio_relay_corrupt_objects_total") > corrupt_before
    objects = bucket_objects(s3_server)
    assert f"main/{manifest_path(backup.id)}" not in objects
    assert f"main/{bad}" not in objects
    assert _relayed(nats_server.url, backup.id) is None
    letters = stream_events(nats_server.url, "klio.main.deadletter")
    assert any("corrupt" in d["reason"] and d["service"] == "klio-relay" for d in letters), letters


def _modified(s3: Any, key: str) -> Any:
    return s3.client().head_object(Bucket=BUCKET, Key=key)["LastModified"]
