"""The bucket layout: keys mirror each cluster's Tier-1 directory under ``<prefix><cluster>/``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from klio_common.pg.walname import is_history_name, is_partial_name, is_segment_name

IDENTITY = "identity.json"
"""The cluster's identity file, relative to the cluster directory."""
DEDUP_KEY = "chunks/dedup.key"
"""The encrypted keyed-hash key of the chunk store, relative to the cluster directory."""

_CHUNK_ID = re.compile(r"[0-9a-f]{64}")
_BACKUP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class Kind(Enum):
    """What a relayable path holds (the only paths the bucket ever receives)."""

    WAL = "wal"
    PARTIAL = "partial"
    HISTORY = "history"
    CHUNK = "chunk"
    MANIFEST = "manifest"
    IDENTITY = "identity"
    DEDUP_KEY = "dedup-key"


def wal_path(name: str) -> str:
    """The relative path of an archived WAL file by its PostgreSQL name.

    Args:
        name: a segment (``000000010000000000000003``), closed partial (``….partial``) or
            history file name (``00000002.history``).

    Raises:
        ValueError: not a WAL file name.
    """
    if is_history_name(name):
        return f"wal/history/{name}"
    if is_segment_name(name) or is_partial_name(name):
        return f"wal/{name[:16]}/{name}"
    raise ValueError(f"'{name}' is not a WAL segment, partial segment or history file name")


def chunk_path(chunk_id: str) -> str:
    """The relative path of a chunk (one level of 256-way fan-out, as on Tier 1).

    Raises:
        ValueError: not a 64-digit lower-case hex id.
    """
    if not _CHUNK_ID.fullmatch(chunk_id):
        raise ValueError(f"'{chunk_id}' is not a chunk id (64 lower-case hex digits)")
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


def manifest_path(backup_id: str) -> str:
    """The relative path of a committed backup's manifest.

    Raises:
        ValueError: not a backup id.
    """
    if not _BACKUP_ID.fullmatch(backup_id):
        raise ValueError(f"'{backup_id}' is not a backup id")
    return f"backups/{backup_id}/manifest"


def kind_of(relative: str) -> Kind | None:
    """What the relative path ``relative`` holds, or None when it is never relayed.

    Leases, progress files, the open ``.partial``, status documents, outboxes and the Tier-2
    journal stay on Tier 1: they describe work in progress, not data.
    """
    parts = relative.split("/")
    match parts:
        case [name] if name == IDENTITY:
            return Kind.IDENTITY
        case ["chunks", "dedup.key"]:
            return Kind.DEDUP_KEY
        case ["chunks", a, chunk_id] if _CHUNK_ID.fullmatch(chunk_id) and a == chunk_id[:2]:
            return Kind.CHUNK
        case ["backups", backup_id, "manifest"] if _BACKUP_ID.fullmatch(backup_id):
            return Kind.MANIFEST
        case ["wal", "history", name] if is_history_name(name):
            return Kind.HISTORY
        case ["wal", group, name] if group == name[:16] and is_segment_name(name):
            return Kind.WAL
        case ["wal", group, name] if group == name[:16] and is_partial_name(name):
            return Kind.PARTIAL
    return None


def normalize_prefix(prefix: str) -> str:
    """``tier2.s3.prefix`` as keys use it: empty, or ending in exactly one ``/``."""
    stripped = prefix.strip("/")
    return f"{stripped}/" if stripped else ""


@dataclass(frozen=True)
class BucketLayout:
    """Keys of one cluster in the bucket: ``<prefix><cluster>/<path relative to Tier 1>``.

    The bucket mirrors the cluster's Tier-1 directory, so the read path finds an object at the
    same relative path on either tier. Build it with `BucketLayout.of`.

    Attributes:
        prefix: the normalized ``tier2.s3.prefix`` (empty or ending in ``/``).
        cluster: the cluster name.
    """

    prefix: str
    cluster: str

    @classmethod
    def of(cls, prefix: str, cluster: str) -> BucketLayout:
        """The layout of ``cluster`` under ``prefix`` (normalized: ``prod`` means ``prod/``)."""
        if not cluster or "/" in cluster:
            raise ValueError(f"invalid cluster name {cluster!r}")
        return cls(normalize_prefix(prefix), cluster)

    @property
    def cluster_prefix(self) -> str:
        """Every key of the cluster starts with this (``<prefix><cluster>/``)."""
        return f"{self.prefix}{self.cluster}/"

    def key(self, relative: str) -> str:
        """The key of the object at ``relative`` (a path relative to the cluster's directory).

        Raises:
            ValueError: ``relative`` is absolute, empty, or climbs out with ``..``.
        """
        parts = relative.split("/")
        if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"not a relative object path: {relative!r}")
        return self.cluster_prefix + relative

    def relative(self, key: str) -> str:
        """The relative path of ``key``, the inverse of `key`.

        Raises:
            ValueError: ``key`` does not belong to this cluster.
        """
        if not key.startswith(self.cluster_prefix) or key == self.cluster_prefix:
            raise ValueError(f"key {key!r} is not under {self.cluster_prefix!r}")
        return key[len(self.cluster_prefix) :]

    def wal_key(self, name: str) -> str:
        """The key of a WAL segment, closed partial or history file (see `wal_path`)."""
        return self.key(wal_path(name))

    def chunk_key(self, chunk_id: str) -> str:
        """The key of a chunk (see `chunk_path`)."""
        return self.key(chunk_path(chunk_id))

    def manifest_key(self, backup_id: str) -> str:
        """The key of a backup's manifest (see `manifest_path`)."""
        return self.key(manifest_path(backup_id))

    @property
    def backups_prefix(self) -> str:
        """List this prefix to find the backups in the bucket (``…/backups/<id>/manifest``)."""
        return self.cluster_prefix + "backups/"

    @property
    def identity_key(self) -> str:
        """The key of the cluster's ``identity.json``."""
        return self.key(IDENTITY)

    @property
    def dedup_key_key(self) -> str:
        """The key of the chunk store's ``dedup.key``."""
        return self.key(DEDUP_KEY)
