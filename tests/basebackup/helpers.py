"""Running the basebackup service against real servers, asking it for backups, reading results."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from klio_common.catalog.backups import BackupCatalog, BackupManifest
from klio_common.catalog.chunks import ChunkStore
from klio_common.compression import get as get_codec
from klio_common.events import BackupRequested, now
from klio_common.events.codec import new_event_id
from klio_common.runtime.bus import Bus
from klio_common.runtime.settings import Settings
from klio_dev import PG_BIN
from klio_dev.waiting import wait_until
from tests.services import ServiceProcess, service_inprocess, stream_events
from tests.wal_receiver.helpers import keyring_of

SERVICE = "basebackup"


def catalog_of(settings: Settings, cluster: str = "main") -> BackupCatalog:
    assert settings.tier1 is not None
    codec = get_codec(settings.compression.algorithm, settings.compression.level)
    return BackupCatalog(settings.tier1.path / cluster, keyring_of(settings), codec)


def store_of(settings: Settings, cluster: str = "main") -> ChunkStore:
    assert settings.tier1 is not None
    codec = get_codec(settings.compression.algorithm, settings.compression.level)
    return ChunkStore(settings.tier1.path / cluster, keyring_of(settings), codec, read_only=True)


def basebackup_inprocess(settings: Settings) -> AbstractContextManager[None]:
    """Run the real basebackup service in this process, on its own thread and event loop."""
    from klio_basebackup.service import main

    return service_inprocess(SERVICE, main, settings, join_timeout=60)


class BasebackupProcess(ServiceProcess):
    """The real ``klio-basebackup`` as a separate process (for kill -9)."""

    def __init__(self, config: Path, log: Path) -> None:
        super().__init__(SERVICE, config, log)


def request_backup(settings: Settings, *request_ids: str, cluster: str = "main") -> list[str]:
    """Publish one ``backup.requested`` per id (fresh ids when none given); return the ids."""
    ids = list(request_ids) or [new_event_id()]

    async def publish() -> None:
        bus = await Bus.connect(settings.nats, name="klio-test", reconnect=False)
        try:
            await bus.ensure_stream()
            for request_id in ids:
                await bus.publish_event(
                    BackupRequested(
                        event_id=new_event_id(),
                        occurred_at=now(),
                        cluster=cluster,
                        system_id="0",
                        request_id=request_id,
                        requested_by="test",
                    )
                )
        finally:
            await bus.close()

    asyncio.run(publish())
    return ids


def events(nats_url: str, subject: str) -> list[dict[str, Any]]:
    """Every event stored in the stream on ``subject`` (a filter), oldest first, as JSON."""
    return stream_events(nats_url, subject, idle=0.5)


def wait_event(
    nats_url: str, subject: str, *, count: int = 1, timeout: float = 120
) -> list[dict[str, Any]]:
    """Wait until at least ``count`` events are stored on ``subject``; return them all."""

    def enough() -> list[dict[str, Any]] | None:
        found = events(nats_url, subject)
        return found if len(found) >= count else None

    return wait_until(
        enough,
        timeout,
        f"{count} event(s) on {subject}",
        interval=0.2,
    )


def wait_backups(settings: Settings, count: int, *, timeout: float = 120) -> list[str]:
    """Wait until the catalog lists ``count`` committed backups; return their ids."""
    catalog = catalog_of(settings)

    def enough() -> list[str] | None:
        ids = catalog.ids()
        return ids if len(ids) >= count else None

    return wait_until(
        enough,
        timeout,
        f"{count} committed backup(s)",
        interval=0.2,
    )


def materialise(settings: Settings, manifest: BackupManifest, dest: Path) -> Path:
    """Write the backup's files from their chunks into ``dest`` (checking sizes and SHA-256)."""
    import hashlib

    store = store_of(settings)
    dest.mkdir(mode=0o700)
    for entry in manifest.files:
        path = dest / entry.path
        if entry.type == "dir":
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            continue
        assert entry.type == "file", entry
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with path.open("wb") as out:
            for chunk_id in entry.chunks:
                data = store.get(chunk_id, source=entry.path)
                assert len(data) <= manifest.chunk_size
                digest.update(data)
                out.write(data)
        assert path.stat().st_size == entry.size, entry.path
        assert entry.sha256 in ("", digest.hexdigest()), entry.path
        path.chmod(entry.mode)
    return dest


def verify_backup(directory: Path) -> subprocess.CompletedProcess[str]:
    """``pg_verifybackup -n`` of a materialised data directory."""
    return subprocess.run(
        [str(PG_BIN / "pg_verifybackup"), "-n", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def make_tablespace(pg: Any, directory: Path, name: str = "ts") -> int:
    """A tablespace in ``directory`` holding a table ``in_ts``; return its oid."""
    directory.mkdir(mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    pg.execute(f"CREATE TABLESPACE {name} LOCATION '{directory}'")
    pg.execute(f"CREATE TABLE in_ts (id int, note text) TABLESPACE {name}")
    pg.execute("INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    return int(pg.sql(f"SELECT oid FROM pg_tablespace WHERE spcname = '{name}'")[0][0])
