"""``klio verify``: re-read a backup's chunks, rebuild its files' checksums, check its WAL range.

PostgreSQL's own ``pg_verifybackup`` only reads plain directories (pitfall P12), so the stored
``backup_manifest`` is checked here against the files rebuilt from their chunks: its own
SHA-256, then every file's size and checksum (SHA-224/256/384/512 or CRC32C).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import crc32c

from klio_common.catalog.backups import BackupManifest, FileEntry
from klio_common.errors import KlioError, NotFound
from klio_common.pg.walname import WalSegment, history_name
from klio_restore.backups import Chunks, open_catalog
from klio_restore.context import ClusterContext

Progress = Callable[[int, int], None]
"""Called with (bytes checked, bytes in total)."""

_PG_HASHES = {"SHA224": "sha224", "SHA256": "sha256", "SHA384": "sha384", "SHA512": "sha512"}


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file of the backup (or one WAL file it needs)."""

    file: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """The result of `verify_backup`."""

    backup: BackupManifest
    files: int
    bytes: int
    chunks: int
    wal_files: int
    pg_manifest_files: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing wrong."""
        return not self.problems

    def document(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return {
            "backup_id": self.backup.id,
            "ok": self.ok,
            "files": self.files,
            "bytes": self.bytes,
            "chunks": self.chunks,
            "wal_start_segment": self.backup.wal_start_segment,
            "wal_end_segment": self.backup.wal_end_segment,
            "wal_files": self.wal_files,
            "backup_manifest_files": self.pg_manifest_files,
            "problems": [{"file": p.file, "reason": p.reason} for p in self.problems],
        }


@dataclass
class _Rebuilt:
    entry: FileEntry
    size: int = 0
    sha256: str = ""
    pg_checksum: str | None = None
    content: bytes | None = None  # kept for backup_manifest only
    problems: list[Problem] = field(default_factory=list)


def verify_backup(
    ctx: ClusterContext,
    backup_id: str | None = None,
    *,
    jobs: int = 4,
    progress: Progress | None = None,
) -> VerifyReport:
    """Check every chunk, file and WAL segment of a backup; collect problems by file.

    Args:
        ctx: the cluster's read-path context (its tier is the one checked).
        backup_id: the backup, or None / ``latest`` for the newest.
        jobs: files checked at once.
        progress: called as files are checked.

    Raises:
        NotFound: no catalog, no backups, or no such backup.
        CorruptObject: the backup's own manifest is unreadable (nothing else can be checked).
        EncryptionKeyError: the configured keys cannot decrypt the manifest.
    """
    catalog = open_catalog(ctx)
    if backup_id in (None, "latest"):
        manifests = catalog.backups.manifests()
        if not manifests:
            raise NotFound("there are no backups to verify", hint="take one with 'klio backup run'")
        backup = manifests[-1]
    else:
        backup = catalog.backups.load(backup_id)
    entries = [e for e in backup.files if e.type == "file"]
    by_path = {e.path: e for e in entries}
    problems: list[Problem] = []

    pg_files: dict[str, dict[str, Any]] = {}
    pg_manifest = by_path.get("backup_manifest")
    if pg_manifest is None:
        problems.append(Problem("backup_manifest", "missing from the backup"))
    else:
        rebuilt = _rebuild(catalog.chunks, pg_manifest, backup.chunk_size, None, keep=True)
        problems += rebuilt.problems
        if rebuilt.content is not None and not rebuilt.problems:
            pg_files, manifest_problems = parse_pg_manifest(rebuilt.content)
            problems += manifest_problems

    total = sum(e.size for e in entries)
    results: dict[str, _Rebuilt] = {}
    done = 0
    with cf.ThreadPoolExecutor(max(1, jobs), thread_name_prefix="klio-verify") as pool:
        futures = [
            pool.submit(
                _rebuild,
                catalog.chunks,
                e,
                backup.chunk_size,
                pg_files.get(e.path, {}).get("Checksum-Algorithm"),
            )
            for e in entries
        ]
        for future in cf.as_completed(futures):
            item = future.result()
            results[item.entry.path] = item
            done += item.entry.size
            if progress is not None:
                progress(done, total)
    for path in sorted(results):
        problems += results[path].problems
    problems += compare_pg_manifest(pg_files, results)
    wal_files, wal_problems = check_wal(ctx, backup)
    problems += wal_problems
    return VerifyReport(
        backup=backup,
        files=len(entries),
        bytes=sum(r.size for r in results.values()),
        chunks=sum(len(e.chunks) for e in entries),
        wal_files=wal_files,
        pg_manifest_files=len(pg_files),
        problems=problems,
    )


def _rebuild(
    chunks: Chunks, entry: FileEntry, chunk_size: int, algorithm: str | None, keep: bool = False
) -> _Rebuilt:
    """Read a file's chunks in order and hash them (never raises for a bad chunk)."""
    out = _Rebuilt(entry)
    sha = hashlib.sha256()
    pg_hash: Any = None
    if algorithm is not None and algorithm.upper() in _PG_HASHES:
        pg_hash = hashlib.new(_PG_HASHES[algorithm.upper()])
    elif algorithm is not None and algorithm.upper() == "CRC32C":
        pg_hash = Crc32c()
    parts: list[bytes] = []
    for index, chunk_id in enumerate(entry.chunks):
        offset = index * chunk_size
        try:
            data = chunks.get(chunk_id, source=f"file {entry.path} (offset {offset})")
        except KlioError as exc:
            out.problems.append(Problem(entry.path, exc.message))
            return out
        except OSError as exc:
            out.problems.append(Problem(entry.path, f"chunk {chunk_id}: {exc.strerror or exc}"))
            return out
        expected = min(chunk_size, entry.size - offset)
        if len(data) != expected:
            out.problems.append(
                Problem(
                    entry.path,
                    f"chunk {chunk_id} at offset {offset} holds {len(data)} bytes, "
                    f"expected {expected}",
                )
            )
            return out
        sha.update(data)
        if pg_hash is not None:
            pg_hash.update(data)
        if keep:
            parts.append(data)
        out.size += len(data)
    out.sha256 = sha.hexdigest()
    if pg_hash is not None:
        out.pg_checksum = pg_hash.hexdigest()
    if keep:
        out.content = b"".join(parts)
    if out.size != entry.size:
        out.problems.append(
            Problem(
                entry.path, f"chunks add up to {out.size} bytes, the manifest says {entry.size}"
            )
        )
    elif entry.sha256 and out.sha256 != entry.sha256:
        out.problems.append(
            Problem(entry.path, f"SHA-256 {out.sha256} differs from the manifest's {entry.sha256}")
        )
    return out


def parse_pg_manifest(content: bytes) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """PostgreSQL's ``backup_manifest``: its files by path, and problems with the manifest itself.

    The manifest's own checksum is the SHA-256 of everything before its last line.
    """
    problems: list[Problem] = []
    try:
        doc = json.loads(content)
    except ValueError as exc:
        return {}, [Problem("backup_manifest", f"not valid JSON: {exc}")]
    if not isinstance(doc, dict) or not isinstance(doc.get("Files"), list):
        return {}, [Problem("backup_manifest", "has no Files list")]
    stated = doc.get("Manifest-Checksum")
    body_end = content.rstrip(b"\n").rfind(b"\n") + 1
    actual = hashlib.sha256(content[:body_end]).hexdigest()
    if stated != actual:
        problems.append(
            Problem("backup_manifest", f"its checksum {stated} does not match its content")
        )
    files: dict[str, dict[str, Any]] = {}
    for item in doc["Files"]:
        if not isinstance(item, dict):
            continue
        path = item.get("Path")
        if path is None and isinstance(item.get("Encoded-Path"), str):
            path = bytes.fromhex(item["Encoded-Path"]).decode(errors="surrogateescape")
        if isinstance(path, str):
            files[path] = item
    return files, problems


def compare_pg_manifest(
    pg_files: dict[str, dict[str, Any]], rebuilt: dict[str, _Rebuilt]
) -> list[Problem]:
    """Every file PostgreSQL listed must be in the backup with its size and checksum."""
    problems: list[Problem] = []
    if not pg_files:
        return problems
    for path, item in sorted(pg_files.items()):
        got = rebuilt.get(path)
        if got is None:
            problems.append(Problem(path, "listed in backup_manifest but not in the backup"))
            continue
        if got.problems:
            continue  # already reported by chunk
        if item.get("Size") != got.size:
            problems.append(
                Problem(path, f"size {got.size} differs from backup_manifest's {item.get('Size')}")
            )
        elif got.pg_checksum is not None and got.pg_checksum != str(item.get("Checksum", "")):
            algorithm = item.get("Checksum-Algorithm")
            problems.append(Problem(path, f"{algorithm} checksum differs from backup_manifest's"))
    for path in sorted(set(rebuilt) - set(pg_files) - {"backup_manifest"}):
        problems.append(Problem(path, "in the backup but not listed in backup_manifest"))
    return problems


def check_wal(ctx: ClusterContext, backup: BackupManifest) -> tuple[int, list[Problem]]:
    """Decode every segment of the backup's WAL range (and its timeline's history file).

    Read from the tier the context reads, so ``--tier 2`` checks the bucket's copies.
    """
    try:
        archive = ctx.wal
        seg_size = archive.segment_size()
        first = WalSegment.parse(backup.wal_start_segment, seg_size)
        last = WalSegment.parse(backup.wal_end_segment, seg_size)
    except (KlioError, ValueError) as exc:
        return 0, [Problem(backup.wal_start_segment, str(exc))]
    names = [
        WalSegment(first.timeline, n, seg_size).name for n in range(first.segno, last.segno + 1)
    ]
    if backup.timeline > 1:
        names.append(history_name(backup.timeline))
    problems: list[Problem] = []
    for name in names:
        try:
            data = archive.read(name, ctx.keyring)
        except KlioError as exc:
            problems.append(Problem(name, exc.message))
            continue
        except OSError as exc:
            problems.append(Problem(name, f"cannot read: {exc.strerror or exc}"))
            continue
        if not name.endswith(".history") and len(data) != seg_size:
            problems.append(Problem(name, f"holds {len(data)} bytes, a segment has {seg_size}"))
    return len(names), problems


class Crc32c:
    """CRC-32C (Castagnoli), PostgreSQL's default manifest checksum, as PostgreSQL prints it
    (hardware CRC32C from the ``crc32c`` package)."""

    def __init__(self) -> None:
        self._value = 0  # the finished CRC so far (what crc32c.crc32c continues from)

    def update(self, data: bytes) -> None:
        """Add bytes."""
        self._value = crc32c.crc32c(data, self._value)

    def hexdigest(self) -> str:
        """Eight hex digits; PostgreSQL writes the value's bytes in memory order (little endian)."""
        return self._value.to_bytes(4, "little").hex()
