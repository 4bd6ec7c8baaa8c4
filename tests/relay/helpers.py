"""Running the relay against the real servers, and reading back the bucket, events and metrics."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from klio_common import compression
from klio_common.catalog.backups import BackupCatalog, BackupManifest, FileEntry
from klio_common.catalog.chunks import ChunkStore
from klio_common.crypto import KeyRing
from klio_common.events import BackupDone, now
from klio_common.events.codec import encode, event_id_for
from klio_common.runtime import metrics
from klio_common.runtime.settings import Settings
from klio_common.storage.layout import kind_of
from klio_dev import S3Server
from klio_dev.waiting import wait_until
from tests.services import ServiceProcess, service_inprocess
from tests.services import stream_events as stream_events

VENV_BIN = Path(sys.executable).parent
CHUNK = 128 * 1024
BUCKET = "klio-test"


def load(config: Path) -> Settings:
    return Settings.load(config, {})


def keyring_of(settings: Settings) -> KeyRing:
    return settings.encryption.keyring() if settings.encryption else KeyRing.none()


def cluster_dir(settings: Settings, cluster: str = "main") -> Path:
    assert settings.tier1 is not None
    return settings.tier1.path / cluster


def relay_inprocess(settings: Settings) -> AbstractContextManager[None]:
    """Run the real relay service in this process, on its own thread and event loop."""
    from klio_relay.service import SERVICE, main

    return service_inprocess(SERVICE, main, settings)


class RelayProcess(ServiceProcess):
    """The real ``klio-relay`` as a separate process (for kill -9)."""

    def __init__(self, config: Path, log: Path) -> None:
        super().__init__("relay", config, log)


# -- the bucket and Tier 1 ---------------------------------------------------------------------


def bucket_objects(
    s3: S3Server, prefix: str = "main/", bucket: str = "klio-test"
) -> dict[str, int]:
    """Key → size of every object under ``prefix``."""
    client = s3.client()
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = item["Size"]
    return found


def bucket_bytes(s3: S3Server, key: str, bucket: str = BUCKET) -> bytes:
    data: bytes = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def tier1_objects(settings: Settings, cluster: str = "main") -> dict[str, Path]:
    """Relative path → file of everything on Tier 1 the relay copies."""
    root = cluster_dir(settings, cluster)
    found = {}
    for file in root.rglob("*"):
        rel = file.relative_to(root).as_posix()
        if file.is_file() and kind_of(rel) is not None:
            found[rel] = file
    return found


def wal_paths(settings: Settings, cluster: str = "main") -> set[str]:
    """Relative paths of the WAL files (segments, closed partials, history) on Tier 1."""
    return {p for p in tier1_objects(settings, cluster) if p.startswith("wal/")}


def assert_bucket_mirrors(s3: S3Server, settings: Settings, paths: set[str], prefix: str) -> None:
    """Every path is in the bucket under ``prefix``, byte for byte as on Tier 1."""
    root = cluster_dir(settings)
    for path in sorted(paths):
        stored = bucket_bytes(s3, prefix + path)
        local = (root / path).read_bytes()
        assert hashlib.sha256(stored).digest() == hashlib.sha256(local).digest(), path


def wait_in_bucket(s3: S3Server, keys: set[str], timeout: float = 120, prefix: str = "") -> None:
    wait_until(
        lambda: keys <= set(bucket_objects(s3, prefix)),
        timeout,
        f"{len(keys)} objects in the bucket",
    )


# -- events and metrics ------------------------------------------------------------------------


def publish(nats_url: str, subject: str, payload: bytes, msg_id: str) -> None:
    import nats

    async def send() -> None:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
        finally:
            await nc.close()

    asyncio.run(send())


def sample(name: str, **labels: str) -> float:
    """The current value of a metric sample on the process registry (0 when absent)."""
    value = metrics.registry().get_sample_value(name, labels)
    return float(value or 0.0)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:
        return 0, str(err)


def service_url(settings: Settings, path: str) -> str:
    service = settings.service("relay")
    return f"http://127.0.0.1:{service.http_port}{path}"


# -- backups built with the catalog directly -----------------------------------------------------


def make_backup(
    settings: Settings,
    backup_id: str,
    files: dict[str, bytes],
    wal_start: str,
    wal_end: str,
    *,
    cluster: str = "main",
    started: datetime | None = None,
    before_commit: Callable[[BackupManifest], None] | None = None,
) -> BackupManifest:
    """Commit a backup of ``files`` (chunked, deduplicated) whose WAL range is already archived.

    ``before_commit`` sees the manifest while its chunks are on Tier 1 and the catalog does not
    list it yet: a relay's reconciliation pass cannot pick the backup up before that returns.
    """
    keyring = keyring_of(settings)
    codec = compression.get(settings.compression.algorithm, settings.compression.level)
    root = cluster_dir(settings, cluster)
    store = ChunkStore(root, keyring, codec)
    catalog = BackupCatalog(root, keyring, codec)
    known = catalog.known_chunks()
    catalog.begin(backup_id)
    entries, new, new_bytes, stored = [], 0, 0, 0
    for path, data in files.items():
        ids = []
        for offset in range(0, len(data), CHUNK):
            piece = data[offset : offset + CHUNK]
            chunk_id = store.chunk_id(piece)
            if chunk_id not in known:
                size = store.put(chunk_id, piece)
                known.add(chunk_id)
                new += 1
                new_bytes += size
            stored += store.path(chunk_id).stat().st_size
            ids.append(chunk_id)
        entries.append(
            FileEntry(
                path=path, size=len(data), chunks=ids, sha256=hashlib.sha256(data).hexdigest()
            )
        )
    store.sync()
    ident = msgspec.json.decode((root / "identity.json").read_bytes())
    start = started or datetime.now(UTC)
    manifest = BackupManifest(
        id=backup_id,
        cluster=cluster,
        system_id=ident["system_id"],
        pg_version=150000,
        timeline=int(wal_start[:8], 16),
        start_lsn="0/0",
        end_lsn="0/0",
        start_time=start,
        end_time=start + timedelta(seconds=1),
        label=f"test {backup_id}",
        chunk_size=CHUNK,
        compression=codec.name,
        key_id=keyring.active,
        size=sum(len(d) for d in files.values()),
        stored_size=stored,
        new_chunk_bytes=new_bytes,
        chunks_total=sum(len(e.chunks) for e in entries),
        chunks_new=new,
        wal_start_segment=wal_start,
        wal_end_segment=wal_end,
        files=entries,
    )
    if before_commit is not None:
        before_commit(manifest)
    catalog.commit(manifest)
    return manifest


def announce_backup(nats_url: str, manifest: BackupManifest) -> None:
    """Publish the ``backup.done`` the basebackup service would publish."""
    event = BackupDone(
        event_id=event_id_for(manifest.cluster, "backup.done", manifest.id),
        occurred_at=now(),
        cluster=manifest.cluster,
        system_id=manifest.system_id,
        backup_id=manifest.id,
        timeline=manifest.timeline,
        start_lsn=manifest.start_lsn,
        end_lsn=manifest.end_lsn,
        start_time=manifest.start_time,
        end_time=manifest.end_time,
        size=manifest.size,
        stored_size=manifest.stored_size,
        new_chunk_bytes=manifest.new_chunk_bytes,
        chunks_total=manifest.chunks_total,
        chunks_new=manifest.chunks_new,
    )
    publish(nats_url, f"klio.{manifest.cluster}.backup.done", encode(event), event.event_id)
