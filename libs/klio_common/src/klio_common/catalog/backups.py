"""The Tier-1 catalog of one cluster's base backups: manifests, leases, commit, listing.

``backups/<id>/manifest`` (an encrypted object holding a `BackupManifest`) is what makes a backup
exist: it is written last, atomically, after every chunk is durable and the backup's WAL range is
archived. A backup in progress holds ``backups/<id>/lease.json`` instead; a crashed backup leaves a
directory with a lease and no manifest, which is never listed and which garbage collection removes
(its chunks become orphans, collectable once no lease is live).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from klio_common import fsio
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject, NotFound
from klio_common.objects import decode_object, encode_object

MANIFEST_FORMAT = 1


class FileEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One member of the backup, relative to PGDATA (tablespaces under ``pg_tblspc/<oid>/``)."""

    path: str
    type: str = "file"  # "file" | "dir" | "link"
    size: int = 0
    mode: int = 0o600
    mtime: int = 0
    chunks: list[str] = []
    sha256: str = ""
    link_target: str = ""


class TablespaceEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A tablespace as BASE_BACKUP reported it (its original location on the primary)."""

    oid: int
    location: str
    size: int = 0


class BackupManifest(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a restore needs, and the figures ``klio backup show`` prints."""

    format: int = MANIFEST_FORMAT
    id: str
    cluster: str
    system_id: str
    pg_version: int
    timeline: int
    start_lsn: str
    end_lsn: str
    start_time: datetime
    end_time: datetime
    label: str
    chunk_size: int
    compression: str
    key_id: str | None
    size: int  # plaintext bytes of all files
    stored_size: int  # bytes on Tier 1 of all chunks the backup references
    new_chunk_bytes: int  # bytes on Tier 1 of the chunks this backup added
    chunks_total: int
    chunks_new: int
    wal_start_segment: str
    wal_end_segment: str
    tablespaces: list[TablespaceEntry] = []
    files: list[FileEntry] = []

    def summary(self) -> dict[str, object]:
        """The JSON of ``klio backup list`` (no file list)."""
        out = msgspec.to_builtins(self)
        del out["files"]
        out["status"] = "done"
        return out  # type: ignore[no-any-return]


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """A backup in progress: who runs it and since when."""

    id: str
    pid: int
    host: str
    started_at: float
    request_id: str | None = None


def new_backup_id(now: datetime | None = None) -> str:
    """A sortable id from the start time: ``20261124T213800Z``."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


class BackupCatalog:
    """Backups of one cluster under ``<tier1>/<cluster>/backups/``.

    Args:
        cluster_dir: ``<tier1>/<cluster>``.
        keyring: keys (manifests are encrypted with the active key).
        codec: compression for manifests.
        file_mode: mode of created files.
        dir_mode: mode of created directories.
    """

    def __init__(
        self,
        cluster_dir: Path,
        keyring: KeyRing,
        codec: Codec,
        *,
        file_mode: int = 0o640,
        dir_mode: int = 0o750,
    ) -> None:
        self.dir = Path(cluster_dir) / "backups"
        self.keyring = keyring
        self.codec = codec
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    def backup_dir(self, backup_id: str) -> Path:
        return self.dir / backup_id

    def manifest_path(self, backup_id: str) -> Path:
        return self.dir / backup_id / "manifest"

    def lease_path(self, backup_id: str) -> Path:
        return self.dir / backup_id / "lease.json"

    # -- lifecycle of one backup ----------------------------------------------------------------

    def begin(self, backup_id: str, *, request_id: str | None = None) -> Lease:
        """Create the backup's directory with a lease (before any chunk is written)."""
        lease = Lease(
            id=backup_id,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=time.time(),
            request_id=request_id,
        )
        fsio.atomic_write(
            self.lease_path(backup_id),
            msgspec.json.encode(lease),
            file_mode=self.file_mode,
            dir_mode=self.dir_mode,
        )
        return lease

    def commit(self, manifest: BackupManifest) -> Path:
        """Write the manifest (this makes the backup visible), then drop the lease."""
        blob = encode_object(
            msgspec.json.encode(manifest),
            kind="manifest",
            name=manifest.id,
            codec=self.codec,
            keyring=self.keyring,
        )
        path = self.manifest_path(manifest.id)
        fsio.write_exclusive(path, blob, file_mode=self.file_mode, dir_mode=self.dir_mode)
        lease = self.lease_path(manifest.id)
        if lease.exists():
            lease.unlink()
            fsio.fsync_dir(lease.parent)
        return path

    def abort(self, backup_id: str) -> None:
        """Remove an uncommitted backup's directory (its chunks stay, as orphans)."""
        if self.manifest_path(backup_id).exists():
            raise ValueError(f"backup {backup_id} is committed; abort is for uncommitted ones")
        shutil.rmtree(self.backup_dir(backup_id), ignore_errors=True)
        if self.dir.is_dir():
            fsio.fsync_dir(self.dir)

    # -- reads ----------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Ids of committed backups, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(e.name for e in os.scandir(self.dir) if (Path(e.path) / "manifest").exists())

    def load(self, backup_id: str) -> BackupManifest:
        """A committed backup's manifest (decrypted and verified).

        Raises:
            NotFound: no such committed backup.
            CorruptObject: the manifest fails its checks.
        """
        path = self.manifest_path(backup_id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"backup {backup_id} does not exist in {self.dir}",
                hint="list the backups with 'klio backup list'",
            ) from None
        _, data = decode_object(blob, self.keyring, source=f"manifest of backup {backup_id}")
        try:
            return msgspec.json.decode(data, type=BackupManifest)
        except msgspec.DecodeError as exc:
            raise CorruptObject(
                f"manifest of backup {backup_id} is unreadable: {exc}",
                hint="restore it from Tier 2; do not use this backup until then",
            ) from exc

    def manifests(self) -> list[BackupManifest]:
        """Every committed backup, ordered by end time (never by name or timeline)."""
        manifests = [self.load(i) for i in self.ids()]
        manifests.sort(key=lambda m: (m.end_time, m.id))
        return manifests

    def leases(self) -> list[Lease]:
        """Backups in progress (or crashed: check `Lease.pid` and `host`)."""
        if not self.dir.is_dir():
            return []
        found = []
        for entry in os.scandir(self.dir):
            path = Path(entry.path)
            if (path / "manifest").exists() or not (path / "lease.json").exists():
                continue
            try:
                found.append(msgspec.json.decode((path / "lease.json").read_bytes(), type=Lease))
            except msgspec.DecodeError:
                continue  # a torn lease is a crashed backup's: garbage collection removes it
        return sorted(found, key=lambda lease: lease.id)

    def known_chunks(self) -> set[str]:
        """Ids of every chunk a committed backup references: the only chunks a backup trusts."""
        known: set[str] = set()
        for backup_id in self.ids():
            for entry in self.load(backup_id).files:
                known.update(entry.chunks)
        return known
