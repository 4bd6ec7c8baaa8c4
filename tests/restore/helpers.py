"""Restore tests: catalog backups made from ``pg_basebackup -Ft``, restored servers, klio runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from klio_common.catalog.backups import (
    BackupCatalog,
    BackupManifest,
    FileEntry,
    TablespaceEntry,
    new_backup_id,
)
from klio_common.catalog.chunks import DEFAULT_CHUNK_SIZE, ChunkStore
from klio_common.compression import get as get_codec
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_common.runtime.settings import Settings
from klio_dev import PostgresServer
from klio_dev.postgres import run_as_postgres
from klio_dev.waiting import wait_until
from tests.wal_receiver.helpers import KLIO, archive_of, keyring_of, postgres_dir, wait_closed


def catalog_parts(settings: Settings, cluster: str = "main") -> tuple[BackupCatalog, ChunkStore]:
    """The writer's view of the cluster's backup catalog (as the basebackup service has it)."""
    archive = archive_of(settings, cluster)
    codec = get_codec(settings.compression.algorithm, settings.compression.level)
    keyring = keyring_of(settings)
    return (
        BackupCatalog(archive.cluster_dir, keyring, codec),
        ChunkStore(archive.cluster_dir, keyring, codec),
    )


def _label_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        fields[key] = value
    return fields


def store_backup(
    pg: PostgresServer,
    settings: Settings,
    workdir: Path,
    *,
    cluster: str = "main",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checksums: str = "SHA256",
) -> BackupManifest:
    """Take ``pg_basebackup -Ft -X none`` and commit it to the catalog as the service would.

    The wal-receiver must be running: the backup commits once its WAL range is archived.
    """
    out = postgres_dir(workdir / f"pgbb-{uuid.uuid4().hex[:8]}")
    spaces = pg.sql(
        "SELECT oid, pg_tablespace_location(oid) FROM pg_tablespace"
        " WHERE spcname NOT IN ('pg_default', 'pg_global')"
    )
    started = datetime.now(UTC)
    run_as_postgres(
        [
            "pg_basebackup",
            "-Ft",
            "-X",
            "none",
            "-c",
            "fast",
            "--no-sync",
            f"--manifest-checksums={checksums}",
            "-D",
            str(out),
            "-d",
            pg.superuser_conninfo(),
        ]
    )
    ended = datetime.now(UTC)
    pg_manifest = (out / "backup_manifest").read_bytes()
    wal = json.loads(pg_manifest)["WAL-Ranges"][0]
    start_lsn, end_lsn = Lsn.parse(wal["Start-LSN"]), Lsn.parse(wal["End-LSN"])
    timeline = int(wal["Timeline"])
    wait_closed(settings, end_lsn, cluster=cluster)

    catalog, chunks = catalog_parts(settings, cluster)
    backup_id = new_backup_id(started)
    while catalog.backup_dir(backup_id).exists():
        backup_id += "x"
    catalog.begin(backup_id)
    known = catalog.known_chunks()
    written: set[str] = set()
    figures = {"stored": 0, "new_bytes": 0, "total": 0, "new": 0}

    def store(path: str, data: bytes, mode: int, mtime: int) -> FileEntry:
        ids = []
        for offset in range(0, len(data), chunk_size):
            piece = data[offset : offset + chunk_size]
            chunk_id = chunks.chunk_id(piece)
            ids.append(chunk_id)
            figures["total"] += 1
            if chunk_id in known or chunk_id in written:
                figures["stored"] += chunks.path(chunk_id).stat().st_size
                continue
            stored = chunks.put(chunk_id, piece)
            written.add(chunk_id)
            figures.update(
                stored=figures["stored"] + stored,
                new_bytes=figures["new_bytes"] + stored,
                new=figures["new"] + 1,
            )
        return FileEntry(
            path=path,
            size=len(data),
            mode=mode,
            mtime=mtime,
            chunks=ids,
            sha256=hashlib.sha256(data).hexdigest(),
        )

    files: list[FileEntry] = []
    label = ""
    archives = [("base.tar", "")] + [(f"{oid}.tar", f"pg_tblspc/{oid}/") for oid, _ in spaces]
    for name, prefix in archives:
        with tarfile.open(out / name) as tar:
            for member in tar:
                path = prefix + member.name.removeprefix("./").rstrip("/")
                if member.isdir():
                    files.append(FileEntry(path=path, type="dir", mode=member.mode))
                elif member.issym():
                    files.append(FileEntry(path=path, type="link", link_target=member.linkname))
                else:
                    reader = tar.extractfile(member)
                    data = reader.read() if reader is not None else b""
                    if path == "backup_label":
                        label = _label_fields(data.decode()).get("LABEL", "")
                    files.append(store(path, data, member.mode, int(member.mtime)))
    files.append(store("backup_manifest", pg_manifest, 0o600, int(ended.timestamp())))
    chunks.sync()

    seg_size = archive_of(settings, cluster).segment_size()
    manifest = BackupManifest(
        id=backup_id,
        cluster=cluster,
        system_id=str(pg.system_identifier()),
        pg_version=int(pg.sql("SHOW server_version_num")[0][0]),
        timeline=timeline,
        start_lsn=str(start_lsn),
        end_lsn=str(end_lsn),
        start_time=started,
        end_time=ended,
        label=label,
        chunk_size=chunk_size,
        compression=settings.compression.algorithm,
        key_id=keyring_of(settings).active,
        size=sum(f.size for f in files),
        stored_size=figures["stored"],
        new_chunk_bytes=figures["new_bytes"],
        chunks_total=figures["total"],
        chunks_new=figures["new"],
        wal_start_segment=WalSegment.from_lsn(timeline, start_lsn, seg_size).name,
        wal_end_segment=WalSegment.from_lsn(timeline, end_lsn - 1, seg_size).name,
        tablespaces=[TablespaceEntry(oid=int(oid), location=loc) for oid, loc in spaces],
        files=files,
    )
    catalog.commit(manifest)
    return manifest


def wait_ready(settings: Settings, service: str, *, timeout: float = 60) -> None:
    """Wait until a service started in-process answers ``/readyz`` with 200."""
    port = settings.service(service).http_port

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                return bool(answer.status == 200)
        except urllib.error.HTTPError as exc:  # 503 until ready; its body holds the socket
            exc.close()
            return False

    wait_until(ready, timeout, f"{service} ready", interval=0.1, ignore=(OSError,))


def backup_now(config: Path, settings: Settings, cluster: str = "main") -> BackupManifest:
    """``klio backup run --wait --json`` against the running basebackup service."""
    done = klio(config, "backup", "run", "--wait", "--json", as_postgres=False)
    assert done.returncode == 0, output_of(done)
    doc = json.loads(done.stdout)
    assert doc["status"] == "done", doc
    return catalog_parts(settings, cluster)[0].load(doc["backup_id"])


def klio(
    config: Path, *args: str, as_postgres: bool = True, cluster: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``klio`` command (as the postgres OS user by default)."""
    argv = [str(KLIO), "--config", str(config)]
    if cluster is not None:
        argv += ["--cluster", cluster]
    argv += list(args)
    if as_postgres and os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, cwd="/")


def output_of(done: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr of a finished command, for assertion messages."""
    return f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"


@dataclass
class Restored:
    """A data directory made by ``klio restore`` and the server that runs on it."""

    server: PostgresServer
    summary: dict[str, Any]


def restore_server(
    workdir: Path,
    config: Path,
    name: str,
    *restore_args: str,
    verify_ignore: tuple[str, ...] = (),
) -> Restored:
    """``klio restore --pgdata`` (as postgres) into a new server's data directory; not started.

    Before the server's own configuration is written, the materialised directory is checked
    with ``pg_verifybackup -n`` against the backup_manifest klio left in it (``verify_ignore``:
    paths it skips, e.g. relocated tablespaces, which it cannot follow before PostgreSQL
    links them).
    """
    server = PostgresServer(workdir, name=name, settings={"shared_buffers": "32MB"})
    server._prepare_root()
    done = klio(config, "restore", "--pgdata", str(server.data_dir), "--json", *restore_args)
    assert done.returncode == 0, output_of(done)
    summary = json.loads(done.stdout)
    ignore = [arg for path in verify_ignore for arg in ("-i", path)]
    verified = run_as_postgres(
        ["pg_verifybackup", "-n", *ignore, str(server.data_dir)], check=False
    )
    assert verified.returncode == 0, f"{name}: pg_verifybackup: {verified.stderr}{verified.stdout}"
    server._write_config()
    server._write_password_file()
    return Restored(server, summary)


def flip_byte(path: Path, *, from_end: int = 20) -> None:
    """Flip one byte of a stored object, near its end (inside the last frame's payload)."""
    data = bytearray(path.read_bytes())
    data[len(data) - from_end] ^= 0x55
    path.write_bytes(bytes(data))
