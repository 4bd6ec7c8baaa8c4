"""The backup catalog as the read path sees it: opening it, and the list/show documents."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from klio_common.catalog.backups import BackupCatalog, BackupManifest, Lease
from klio_common.catalog.chunks import ChunkStore
from klio_common.errors import NotFound
from klio_restore.context import ClusterContext
from klio_restore.tier2 import BucketBackups, BucketChunks, BucketWal

_ESTIMATE_KEYS = ("bytes_estimated", "bytes_total", "estimated_bytes")


Manifests = BackupCatalog | BucketBackups
"""Committed backups on either tier (the bucket never holds backups in progress)."""
Chunks = ChunkStore | BucketChunks
"""The chunk store on either tier: ``get(id, source=)`` returns verified plaintext."""


@dataclass(frozen=True)
class Catalog:
    """One cluster's backups and chunk store on one tier, opened read-only.

    Attributes:
        backups: committed manifests (and, on Tier 1, leases).
        chunks: the content-addressed chunk store (never written by the read path).
        tier: 1 (the volume) or 2 (the bucket).
    """

    backups: Manifests
    chunks: Chunks
    tier: int = 1


def open_catalog(ctx: ClusterContext) -> Catalog:
    """Open the cluster's backup catalog on the tier the context reads.

    Raises:
        NotFound: the tier holds nothing for this cluster.
        ConfigError: the tier is not configured.
    """
    if ctx.tier == 2:
        bucket = ctx.bucket
        if BucketWal(bucket).read_identity() is None:
            raise NotFound(
                f"no catalog for cluster '{ctx.cluster.name}' in {bucket.where} (no identity.json)",
                hint="check tier2.s3.bucket, tier2.s3.prefix and --cluster; the relay copies "
                "identity.json first",
            )
        return Catalog(
            backups=BucketBackups(bucket, ctx.keyring),
            chunks=BucketChunks(bucket, ctx.keyring),
            tier=2,
        )
    cluster_dir = ctx.archive.cluster_dir
    if not cluster_dir.is_dir():
        raise NotFound(
            f"no catalog for cluster '{ctx.cluster.name}' at {cluster_dir}",
            hint="check tier1.path and --cluster, and that this OS user can read the Tier-1 volume",
        )
    tier1 = ctx.settings.tier1
    modes = {"file_mode": tier1.file_mode, "dir_mode": tier1.dir_mode} if tier1 else {}
    return Catalog(
        backups=BackupCatalog(cluster_dir, ctx.keyring, ctx.codec, **modes),
        chunks=ChunkStore(cluster_dir, ctx.keyring, ctx.codec, read_only=True, **modes),
    )


def summary(manifest: BackupManifest) -> dict[str, Any]:
    """The ``backup list --json`` object of a committed backup (JSON types only)."""
    doc = manifest.summary()  # to_builtins: times as ISO 8601 text
    doc["file_count"] = sum(1 for f in manifest.files if f.type == "file")
    return doc


def read_progress(catalog: Manifests, backup_id: str) -> dict[str, Any]:
    """``progress.json`` of a backup in progress: ``phase``, ``bytes_done``, ``bytes_estimated``.

    Missing or torn files read as no progress yet.
    """
    raw: Any = {}
    if isinstance(catalog, BackupCatalog):
        path = catalog.backup_dir(backup_id) / "progress.json"
        try:
            raw = msgspec.json.decode(path.read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            raw = {}
    if not isinstance(raw, dict):
        raw = {}
    done = raw.get("bytes_done")
    estimate = next((raw[k] for k in _ESTIMATE_KEYS if raw.get(k) is not None), None)
    phase = raw.get("phase")
    return {
        "phase": phase if isinstance(phase, str) else None,
        "bytes_done": int(done) if isinstance(done, int | float) else 0,
        "bytes_estimated": int(estimate) if isinstance(estimate, int | float) else None,
    }


def lease_status(lease: Lease, *, host: str | None = None) -> str:
    """``running``, or ``abandoned`` when its process on this host is gone (a crashed backup).

    A lease from another host (another pod) cannot be checked and counts as running.
    """
    if lease.host != (host or socket.gethostname()):
        return "running"
    try:
        os.kill(lease.pid, 0)
    except ProcessLookupError:
        return "abandoned"
    except PermissionError:
        return "running"
    return "running"


def running(catalog: Manifests, lease: Lease, now: float | None = None) -> dict[str, Any]:
    """The ``backup list --json`` object of a backup in progress."""
    progress = read_progress(catalog, lease.id)
    started = datetime.fromtimestamp(lease.started_at, UTC)
    return {
        "id": lease.id,
        "status": lease_status(lease),
        "timeline": None,
        "start_lsn": None,
        "end_lsn": None,
        "start_time": started.isoformat(),
        "end_time": None,
        "size": None,
        "stored_size": None,
        "phase": progress["phase"],
        "bytes_done": progress["bytes_done"],
        "bytes_estimated": progress["bytes_estimated"],
        "running_seconds": round((now or time.time()) - lease.started_at, 1),
        "host": lease.host,
        "pid": lease.pid,
        "request_id": lease.request_id,
    }


def list_documents(catalog: Manifests) -> list[dict[str, Any]]:
    """Every committed backup (by end time), then every backup in progress."""
    docs = [summary(m) for m in catalog.manifests()]
    docs += [running(catalog, lease) for lease in catalog.leases()]
    return docs


def show_document(catalog: Manifests, backup_id: str) -> dict[str, Any]:
    """``backup show ID --json``: figures, dedup, WAL range, tablespaces (no file list).

    Raises:
        NotFound: neither a committed backup nor one in progress has this id.
    """
    if backup_id in ("latest", "newest"):
        manifests = catalog.manifests()
        if not manifests:
            raise NotFound("there are no backups", hint="take one with 'klio backup run --wait'")
        backup_id = manifests[-1].id
    try:
        manifest = catalog.load(backup_id)
    except NotFound:
        for lease in catalog.leases():
            if lease.id == backup_id:
                return running(catalog, lease)
        raise
    doc = summary(manifest)
    doc["directory_count"] = sum(1 for f in manifest.files if f.type == "dir")
    doc["duration_seconds"] = round((manifest.end_time - manifest.start_time).total_seconds(), 1)
    doc["dedup"] = {
        "chunks_total": manifest.chunks_total,
        "chunks_new": manifest.chunks_new,
        "chunks_reused": manifest.chunks_total - manifest.chunks_new,
        "new_chunk_bytes": manifest.new_chunk_bytes,
        "stored_size": manifest.stored_size,
        "size": manifest.size,
        "ratio": round(manifest.size / manifest.stored_size, 2) if manifest.stored_size else None,
    }
    doc["wal"] = {
        "timeline": manifest.timeline,
        "start_segment": manifest.wal_start_segment,
        "end_segment": manifest.wal_end_segment,
        "start_lsn": manifest.start_lsn,
        "end_lsn": manifest.end_lsn,
    }
    return doc
