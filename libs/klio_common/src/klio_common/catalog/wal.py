"""The Tier-1 WAL archive of one cluster: layout, identity guard, idempotent ingest, reads."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from klio_common import fsio
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.errors import ConflictError, CorruptObject, IdentityMismatch, NotFound
from klio_common.objects import ObjectHeader, decode_object, encode_object, read_header
from klio_common.pg.timeline import TimelineHistory
from klio_common.pg.walname import (
    WalSegment,
    history_name,
    is_history_name,
    is_partial_name,
    is_segment_name,
    parse_history_name,
)

IDENTITY_FORMAT = 1


class ClusterIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """What the archive records once about the PostgreSQL cluster it belongs to."""

    format: int = IDENTITY_FORMAT
    cluster: str
    system_id: str
    wal_segment_size: int
    pg_version: int
    created_at: int


@dataclass(frozen=True)
class StoredObject:
    """The result of storing one object: its header, path, size, and whether it was new."""

    header: ObjectHeader
    path: Path
    stored_size: int
    created: bool


class WalArchive:
    """The WAL archive of one cluster under ``<tier1>/<cluster>/``.

    Only the wal-receiver writes here; every other party reads (retention deletes, under its rules).

    Args:
        root: the Tier-1 path (``tier1.path``).
        cluster: the cluster name.
        file_mode: mode of created files.
        dir_mode: mode of created directories.
    """

    def __init__(
        self, root: Path, cluster: str, *, file_mode: int = 0o640, dir_mode: int = 0o750
    ) -> None:
        self.root = Path(root)
        self.cluster = cluster
        self.cluster_dir = self.root / cluster
        self.wal_dir = self.cluster_dir / "wal"
        self.history_dir = self.wal_dir / "history"
        self.open_dir = self.wal_dir / "open"
        self.identity_path = self.cluster_dir / "identity.json"
        self.status_path = self.wal_dir / "status.json"
        self.file_mode = file_mode
        self.dir_mode = dir_mode

    # -- layout -------------------------------------------------------------------------------

    def segment_path(self, name: str) -> Path:
        """Where a complete segment (or a closed ``.partial``) named ``name`` lives."""
        return self.wal_dir / name[:16] / name

    def history_path(self, timeline: int) -> Path:
        """Where the history file of ``timeline`` lives."""
        return self.history_dir / history_name(timeline)

    def path_for(self, name: str) -> Path:
        """The path of any archived WAL file by its PostgreSQL name (segment, partial, history)."""
        if is_history_name(name):
            return self.history_dir / name
        if is_segment_name(name) or is_partial_name(name):
            return self.segment_path(name)
        raise NotFound(
            f"'{name}' is not a WAL segment or timeline history file name",
            hint="restore_command passes %f, e.g. 000000010000000000000003 or 00000002.history",
        )

    def relative(self, path: Path) -> str:
        """``path`` relative to the cluster directory, as events carry it."""
        return path.relative_to(self.cluster_dir).as_posix()

    # -- identity -----------------------------------------------------------------------------

    def read_identity(self) -> ClusterIdentity | None:
        """The recorded identity, or None for a new archive."""
        try:
            data = self.identity_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(data, type=ClusterIdentity)
        except msgspec.DecodeError as exc:
            raise CorruptObject(
                f"archive identity file {self.identity_path} is corrupt: {exc}",
                hint="restore it from Tier 2, or move the archive aside if it is not needed",
            ) from exc

    def ensure_identity(
        self, system_id: int | str, wal_segment_size: int, pg_version: int, now: int
    ) -> ClusterIdentity:
        """Record the cluster's identity once; refuse WAL from any other cluster.

        Raises:
            IdentityMismatch: the archive belongs to another system identifier or segment size.
        """
        current = self.read_identity()
        if current is None:
            ident = ClusterIdentity(
                cluster=self.cluster,
                system_id=str(system_id),
                wal_segment_size=wal_segment_size,
                pg_version=pg_version,
                created_at=now,
            )
            try:
                fsio.write_exclusive(
                    self.identity_path,
                    msgspec.json.encode(ident),
                    file_mode=self.file_mode,
                    dir_mode=self.dir_mode,
                )
            except ConflictError:
                pass  # another writer recorded it first: compare below
            current = self.read_identity()
            assert current is not None
        if current.system_id != str(system_id):
            raise IdentityMismatch(
                f"WAL from PostgreSQL system {system_id} refused: the archive of cluster "
                f"'{self.cluster}' at {self.cluster_dir} belongs to system {current.system_id}",
                hint="give each PostgreSQL cluster its own cluster name (and Tier-1 directory); "
                "never point two clusters at one archive",
            )
        if current.wal_segment_size != wal_segment_size:
            raise IdentityMismatch(
                f"the archive of cluster '{self.cluster}' holds {current.wal_segment_size}-byte "
                f"segments but the server uses {wal_segment_size}-byte segments",
                hint="wal_segment_size cannot change for an archive; start a new archive",
            )
        return current

    def segment_size(self) -> int:
        """The cluster's WAL segment size from the identity file."""
        ident = self.read_identity()
        if ident is None:
            raise NotFound(
                f"no WAL archive for cluster '{self.cluster}' at {self.cluster_dir}",
                hint="check tier1.path and the cluster name; the wal-receiver creates the archive",
            )
        return ident.wal_segment_size

    # -- writes -------------------------------------------------------------------------------

    def _store(
        self,
        path: Path,
        plaintext: bytes | memoryview,
        *,
        kind: str,
        name: str,
        codec: Codec,
        keyring: KeyRing,
        extra: dict[str, str] | None = None,
    ) -> StoredObject:
        if path.exists():
            header = self.header(path)
            digest = hashlib.sha256(plaintext).hexdigest()
            if header.plaintext_sha256 == digest:
                return StoredObject(header, path, path.stat().st_size, created=False)
            raise ConflictError(
                f"{kind} {name} is already archived with different content "
                f"(stored sha256 {header.plaintext_sha256}, new {digest})",
                hint="this means split brain, corruption or two clusters writing one archive; "
                "the stored file was kept; investigate before removing anything",
            )
        data = encode_object(
            plaintext, kind=kind, name=name, codec=codec, keyring=keyring, extra=extra
        )
        # A segment is read again only by the relay and by restores: not worth the page cache.
        fsio.write_exclusive(
            path, data, file_mode=self.file_mode, dir_mode=self.dir_mode, direct=kind != "history"
        )
        return StoredObject(read_header(data), path, len(data), created=True)

    def store_segment(
        self,
        name: str,
        plaintext: bytes | memoryview,
        *,
        codec: Codec,
        keyring: KeyRing,
        extra: dict[str, str] | None = None,
    ) -> StoredObject:
        """Store a complete segment, or a closed ``<name>.partial``; idempotent.

        Raises:
            ConflictError: the name exists with different content (never overwritten).
        """
        kind = "partial" if is_partial_name(name) else "wal"
        return self._store(
            self.segment_path(name),
            plaintext,
            kind=kind,
            name=name,
            codec=codec,
            keyring=keyring,
            extra=extra,
        )

    def store_history(
        self, timeline: int, content: bytes, *, codec: Codec, keyring: KeyRing
    ) -> StoredObject:
        """Store the history file of ``timeline``; idempotent."""
        name = history_name(timeline)
        return self._store(
            self.history_path(timeline),
            content,
            kind="history",
            name=name,
            codec=codec,
            keyring=keyring,
        )

    def write_status(self, status: dict[str, Any]) -> None:
        """Replace the receiver's status document (read by ``klio wal status``)."""
        fsio.atomic_write(
            self.status_path,
            msgspec.json.encode(status),
            file_mode=self.file_mode,
            dir_mode=self.dir_mode,
        )

    # -- reads --------------------------------------------------------------------------------

    def read_status(self) -> dict[str, Any] | None:
        """The receiver's last status document, or None."""
        try:
            result: dict[str, Any] = msgspec.json.decode(self.status_path.read_bytes())
        except FileNotFoundError:
            return None
        return result

    def header(self, path: Path) -> ObjectHeader:
        """The header of a stored object (reads only its beginning)."""
        with path.open("rb") as f:
            head = f.read(64 * 1024)
        return read_header(head, source=str(path))

    def read(self, name: str, keyring: KeyRing) -> bytes:
        """The verified plaintext of an archived WAL file by its PostgreSQL name.

        Raises:
            NotFound: it is not archived.
            CorruptObject: it fails its checks.
        """
        path = self.path_for(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"WAL file {name} is not in the Tier-1 archive") from None
        header, plaintext = decode_object(data, keyring, source=f"WAL file {name} ({path})")
        if header.name != name:
            raise CorruptObject(
                f"WAL file {path} holds {header.name}, not {name}",
                hint="the file was renamed or copied by hand; restore it from Tier 2",
            )
        return plaintext

    def read_history(self, timeline: int, keyring: KeyRing) -> TimelineHistory:
        """The parsed history file of ``timeline``."""
        text = self.read(history_name(timeline), keyring).decode()
        return TimelineHistory.parse(timeline, text)

    def iter_segment_files(self) -> Iterator[tuple[str, Path]]:
        """Every archived complete segment and closed partial: (name, path), unordered."""
        if not self.wal_dir.is_dir():
            return
        for sub in os.scandir(self.wal_dir):
            if not sub.is_dir() or len(sub.name) != 16:
                continue
            for entry in os.scandir(sub.path):
                if is_segment_name(entry.name) or is_partial_name(entry.name):
                    yield entry.name, Path(entry.path)

    def list_segments(self, seg_size: int | None = None) -> list[WalSegment]:
        """Complete segments, sorted by (segno, timeline)."""
        size = seg_size or self.segment_size()
        segs = [
            WalSegment.parse(name, size)
            for name, _ in self.iter_segment_files()
            if is_segment_name(name)
        ]
        segs.sort(key=lambda s: (s.segno, s.timeline))
        return segs

    def list_partials(self) -> list[str]:
        """Closed ``.partial`` files (ends of old timelines), sorted."""
        return sorted(n for n, _ in self.iter_segment_files() if is_partial_name(n))

    def list_history(self) -> list[int]:
        """Timelines whose history file is archived, ascending."""
        if not self.history_dir.is_dir():
            return []
        return sorted(
            parse_history_name(e.name)
            for e in os.scandir(self.history_dir)
            if is_history_name(e.name)
        )
