"""Restore: check everything first, then materialise PGDATA from a backup's chunks in parallel.

Nothing is written until every check passed (empty target directories, a backup that fits the
target, the WAL the recovery needs). A restore that fails half-way (a corrupt chunk, a full disk)
removes what it wrote, so the directories are as empty as they were.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klio_common import fsio
from klio_common.catalog.backups import BackupManifest
from klio_common.errors import KlioError
from klio_restore.backups import open_catalog
from klio_restore.context import ClusterContext
from klio_restore.pgdata import DEFAULT_JOBS, Progress, materialise
from klio_restore.recovery import (
    RecoveryTarget,
    check_archive_reach,
    choose_backup,
    recovery_settings,
    write_recovery,
)


class RestoreError(KlioError):
    """A restore was refused (before anything was written) or failed (and was cleaned up)."""


@dataclass(frozen=True)
class RestoreRequest:
    """What to restore where.

    Attributes:
        pgdata: the data directory to create (must not exist, or be empty).
        restore_command: PostgreSQL's ``restore_command`` (see `recovery.wal_restore_command`).
        target: where recovery stops (default: the end of the archive).
        backup_id: a backup id, or None / ``latest`` to let the target choose.
        jobs: chunks fetched and written at once.
        tablespace_map: original tablespace location → new location (both absolute).
    """

    pgdata: Path
    restore_command: str
    target: RecoveryTarget = field(default_factory=RecoveryTarget)
    backup_id: str | None = None
    jobs: int = DEFAULT_JOBS
    tablespace_map: Mapping[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class RestoreResult:
    """A materialised data directory, ready to start."""

    backup: BackupManifest
    target: RecoveryTarget
    pgdata: Path
    tablespaces: dict[int, Path]
    files: int
    bytes: int
    seconds: float

    def document(self) -> dict[str, Any]:
        """The ``--json`` summary."""
        return {
            "backup_id": self.backup.id,
            "pgdata": str(self.pgdata),
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "target": self.target.document(),
            "tablespaces": {str(oid): str(p) for oid, p in sorted(self.tablespaces.items())},
            "backup_end_lsn": self.backup.end_lsn,
            "backup_end_time": self.backup.end_time.isoformat(),
        }


def parse_tablespace_map(items: Sequence[str]) -> dict[str, Path]:
    """Parse ``--tablespace-map OLD=NEW`` options (absolute paths, as ``pg_basebackup -T``).

    Raises:
        RestoreError: not ``OLD=NEW``, a relative path, or OLD given twice.
    """
    mapping: dict[str, Path] = {}
    for item in items:
        old, eq, new = item.partition("=")
        if not eq or not old or not new or not old.startswith("/") or not new.startswith("/"):
            raise RestoreError(
                f"invalid --tablespace-map {item!r}",
                hint="give OLD=NEW with the tablespace's original absolute location and a new "
                "absolute directory, e.g. /srv/ts1=/restore/ts1",
            )
        key = os.path.normpath(old)
        if key in mapping:
            raise RestoreError(f"--tablespace-map names {old} twice")
        mapping[key] = Path(os.path.normpath(new))
    return mapping


def restore(
    ctx: ClusterContext, request: RestoreRequest, *, progress: Progress | None = None
) -> RestoreResult:
    """Materialise PGDATA from a backup and write its recovery settings.

    Args:
        ctx: the cluster's read-path context: backups, chunks and the WAL check come from
            its tier (``ctx.tier == 2``: the bucket alone).
        request: what to restore where.
        progress: called as chunks are written.

    Returns:
        What was restored.

    Raises:
        RestoreError: a directory is not empty, or a tablespace mapping is wrong.
        TargetError: the target does not fit the backups or the WAL archive.
        NotFound: no catalog, no backups, or an unknown backup id.
        CorruptObject: a chunk fails its checks (the message names the file).
        EncryptionKeyError: the configured keys cannot decrypt the catalog.
    """
    started = time.monotonic()
    pgdata = Path(request.pgdata).absolute()
    check_empty(pgdata, "PGDATA")
    catalog = open_catalog(ctx)
    backup = choose_backup(catalog.backups.manifests(), request.target, request.backup_id)
    locations = tablespace_locations(backup, request.tablespace_map, pgdata)
    check_archive_reach(ctx.wal, ctx.keyring, backup, request.target)

    roots = [pgdata, *locations.values()]
    made = [_first_missing(p) for p in roots]
    try:
        for root in roots:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            root.chmod(0o700)
        files, size = materialise(
            catalog.chunks, backup, pgdata, locations, jobs=request.jobs, progress=progress
        )
        if locations or any(f.path == "tablespace_map" for f in backup.files):
            write_tablespace_map(pgdata, locations)
        write_recovery(pgdata, recovery_settings(request.target, request.restore_command))
        for root in roots:
            fsio.syncfs(root)
    except BaseException as exc:
        for root, top in zip(roots, made, strict=True):
            _remove(root, created=top)
        if isinstance(exc, OSError) and exc.errno in fsio.NO_SPACE:
            where = " and ".join(str(root) for root in roots)
            raise RestoreError(
                f"no space left on device restoring backup {backup.id} into {where}",
                hint=f"the backup holds {backup.size // (1 << 20)} MiB of files; free space "
                "there or restore onto a larger volume; what this restore wrote was removed",
            ) from exc
        raise
    return RestoreResult(
        backup=backup,
        target=request.target,
        pgdata=pgdata,
        tablespaces=locations,
        files=files,
        bytes=size,
        seconds=time.monotonic() - started,
    )


def check_empty(path: Path, what: str) -> None:
    """Refuse a directory that exists and is not empty (or is not a directory).

    Raises:
        RestoreError: it holds something.
    """
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise RestoreError(
            f"{what} {path} exists and is not a directory",
            hint="give a new or empty directory",
        )
    with os.scandir(path) as entries:
        first = next(entries, None)
    if first is not None:
        raise RestoreError(
            f"{what} {path} is not empty (it holds {first.name})",
            hint="restore into a new or empty directory; klio restore never overwrites data",
        )


def tablespace_locations(
    backup: BackupManifest, mapping: Mapping[str, Path], pgdata: Path
) -> dict[int, Path]:
    """Where each tablespace of the backup goes: the mapped location, else the original.

    Raises:
        RestoreError: a mapping names no tablespace of the backup, two tablespaces would share a
            directory, or a target directory is not empty (an unmapped tablespace's original
            location is usually the primary's own tablespace, pitfall P11).
    """
    by_location = {os.path.normpath(t.location): t for t in backup.tablespaces}
    unknown = sorted(set(mapping) - set(by_location))
    if unknown:
        known = ", ".join(sorted(by_location)) or "none"
        raise RestoreError(
            f"--tablespace-map names {', '.join(unknown)}, which is not a tablespace location "
            f"of backup {backup.id}",
            hint=f"OLD is the tablespace's original location; this backup has: {known}",
        )
    locations: dict[int, Path] = {}
    for location, ts in sorted(by_location.items()):
        new = mapping.get(location)
        dest = new if new is not None else Path(location)
        if dest in locations.values() or dest == pgdata:
            raise RestoreError(
                f"two tablespaces (or a tablespace and PGDATA) would share {dest}",
                hint="map each tablespace to its own directory with --tablespace-map",
            )
        if new is None and dest.exists() and any(dest.iterdir()):
            raise RestoreError(
                f"tablespace {ts.oid} would be restored to its original location {dest}, "
                "which is not empty (is it the primary's tablespace?)",
                hint=f"relocate it with --tablespace-map {location}=/new/empty/directory",
            )
        check_empty(dest, f"tablespace directory for {ts.oid}")
        locations[ts.oid] = dest
    return locations


def write_tablespace_map(pgdata: Path, locations: Mapping[int, Path]) -> None:
    """Rewrite ``tablespace_map`` with the new absolute locations (PostgreSQL makes the links)."""
    lines = []
    for oid, location in sorted(locations.items()):
        text = str(location).replace("\\", "\\\\").replace("\n", "\\\n").replace("\r", "\\\r")
        lines.append(f"{oid} {text}\n")
    path = pgdata / "tablespace_map"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, "".join(lines).encode())
    finally:
        os.close(fd)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory a restore to ``path`` creates, or None when ``path`` exists."""
    top = None
    while not path.exists() and path != path.parent:
        top, path = path, path.parent
    return top


def _remove(root: Path, *, created: Path | None) -> None:
    """Undo a failed restore: remove what we created above ``root``, else empty ``root``."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    if not root.is_dir():
        return
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
