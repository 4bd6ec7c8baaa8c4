"""Retention tests: ``klio retention`` runs, backdated backups, what each tier holds."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from klio_common import compression, fsio
from klio_common.catalog.backups import BackupCatalog, BackupManifest, FileEntry
from klio_common.catalog.chunks import ChunkStore
from klio_common.catalog.wal import WalArchive
from klio_common.objects import encode_object
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_common.runtime.settings import Settings
from klio_common.storage.layout import Kind, kind_of
from klio_dev import PostgresServer, S3Server
from tests.basebackup.helpers import basebackup_inprocess, catalog_of
from tests.fixtures.paths import KlioConfigWriter
from tests.restore.helpers import backup_now, klio, output_of, wait_ready
from tests.wal_receiver.helpers import (
    VENV_BIN,
    close_segment,
    keyring_of,
    load,
    receiver_inprocess,
)

BUCKET = "klio-test"
SEG = 1 << 20


def keep_one_backup(
    klio_config: KlioConfigWriter,
    pg: PostgresServer,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
) -> tuple[Path, Settings]:
    """A cluster keeping one backup on Tier 1 (no chunk grace), with a 30,000-row table ``t``."""
    config = klio_config(
        pg=pg,
        nats=nats_server,
        tier1=tier1_dir,
        keys=keyring_files,
        cluster={"retention": {"tier1": "REDUNDANCY 1"}},
        extra={"retention": {"chunk_grace": 0}},
    )
    pg.execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 30000) g"
    )
    return config, load(config)


def retention(config: Path, *args: str) -> list[dict[str, Any]]:
    """``klio retention <args> --json`` (as root, like the service); its JSON documents."""
    done = klio(config, "retention", *args, "--json", as_postgres=False)
    assert done.returncode == 0, output_of(done)
    docs: list[dict[str, Any]] = json.loads(done.stdout)
    return docs


def one_shot(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``klio-retention --config F <args>`` as its own process (for kill -9)."""
    return subprocess.Popen(
        [str(VENV_BIN / "klio-retention"), "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def process_state(pid: int) -> str:
    """The state letter of a process (``T`` once it stopped itself)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def backdate(settings: Settings, backup_id: str, by: timedelta) -> None:
    """Move a committed backup's start and end times back (constructing age instead of waiting)."""
    catalog = catalog_of(settings)
    manifest = catalog.load(backup_id)
    older = msgspec.structs.replace(
        manifest, start_time=manifest.start_time - by, end_time=manifest.end_time - by
    )
    blob = encode_object(
        msgspec.json.encode(older),
        kind="manifest",
        name=backup_id,
        codec=catalog.codec,
        keyring=catalog.keyring,
    )
    fsio.atomic_write(catalog.manifest_path(backup_id), blob)


def tier1_bytes(settings: Settings, cluster: str = "main") -> int:
    """Stored bytes of what retention may delete on Tier 1: manifests, WAL and chunks."""
    assert settings.tier1 is not None
    root = settings.tier1.path / cluster
    total = 0
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        kind = kind_of(rel) if path.is_file() else None
        if kind in (Kind.WAL, Kind.PARTIAL, Kind.CHUNK, Kind.MANIFEST):
            total += path.stat().st_size
    return total


def bucket_sizes(s3: S3Server, prefix: str = "main/") -> dict[str, int]:
    """Key → size of every object under ``prefix``."""
    found: dict[str, int] = {}
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = item["Size"]
    return found


def synthetic_cluster(
    settings: Settings, starts: list[int], *, first: int = 1, wal: range = range(1, 10)
) -> list[str]:
    """A cluster on Tier 1 without PostgreSQL: 1 MiB segments ``wal``, and a backup
    starting in each segment of ``starts`` (ids numbered from ``first``, ending ``10 - n`` days
    ago), each with a chunk of its own and one it shares with the others of this call."""
    assert settings.tier1 is not None
    keyring = keyring_of(settings)
    codec = compression.get("zstd", 3)
    archive = WalArchive(settings.tier1.path, "main")
    archive.ensure_identity(7400000000000000001, SEG, 150000, 0)
    for segno in wal:
        name = WalSegment(1, segno, SEG).name
        archive.store_segment(name, bytes(SEG), codec=codec, keyring=keyring)
    catalog = BackupCatalog(archive.cluster_dir, keyring, codec)
    store = ChunkStore(archive.cluster_dir, keyring, codec)
    shared = secrets.token_bytes(1000)
    ids = []
    for n, segno in enumerate(starts, start=first):
        backup_id = f"202601{n:02d}T000000Z"
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
        ended = datetime.now(UTC) - timedelta(days=10 - n)
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


def three_backups(pg: PostgresServer, config: Path, settings: Settings) -> list[str]:
    """Three backups of ``keep_one_backup``'s cluster, ``t`` changed before each, and the WAL
    after the last one archived; returns their ids, oldest first."""
    ids = []
    with receiver_inprocess(settings), basebackup_inprocess(settings):
        wait_ready(settings, "basebackup")
        for round_ in range(3):
            pg.execute("UPDATE t SET v = md5(v || %s)", (str(round_),))
            ids.append(backup_now(config, settings).id)
        close_segment(pg, settings)
    return ids
