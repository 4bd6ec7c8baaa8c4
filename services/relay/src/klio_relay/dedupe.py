"""The pure decision for one object: upload it, skip it (already there), or report a conflict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from klio_common.storage.s3 import ObjectInfo, same_checksum

META_PLAINTEXT_SHA256 = "klio-plaintext-sha256"
"""User metadata on every uploaded object: the SHA-256 of its plaintext (as in its header)."""
META_KIND = "klio-kind"
"""User metadata on every uploaded object: what it holds (``wal``, ``chunk``, ``manifest`` ...)."""


class Action(Enum):
    """What to do with one object."""

    UPLOAD = "upload"
    SKIP = "skip"
    CONFLICT = "conflict"
    FETCH = "fetch"  # the bucket cannot tell by its checksum: compare the bytes


@dataclass(frozen=True)
class Local:
    """The Tier-1 object, as it is to be uploaded.

    Attributes:
        size: stored bytes.
        sha256: hex SHA-256 of the stored bytes.
        checksum: the base64 checksum S3 will store for our upload of it (plain or composite).
        plaintext_sha256: hex SHA-256 of its plaintext, None for files that are not objects.
    """

    size: int
    sha256: str
    checksum: str
    plaintext_sha256: str | None


@dataclass(frozen=True)
class Remote:
    """The object already under the same key in the bucket.

    Attributes:
        size: stored bytes.
        checksum: the stored ``x-amz-checksum-sha256``, or None.
        plaintext_sha256: from our metadata, or None (uploaded by something else).
        sha256: hex SHA-256 of its bytes once downloaded (`Action.FETCH`), else None.
    """

    size: int
    checksum: str | None
    plaintext_sha256: str | None = None
    sha256: str | None = None

    @classmethod
    def of(cls, info: ObjectInfo, sha256: str | None = None) -> Remote:
        """The remote side from a HEAD answer (and the hash of the downloaded bytes, if any)."""
        meta: Mapping[str, str] = info.metadata
        return cls(
            size=info.size,
            checksum=info.checksum_sha256,
            plaintext_sha256=meta.get(META_PLAINTEXT_SHA256),
            sha256=sha256,
        )


@dataclass(frozen=True)
class Decision:
    """An action and why, in words fit for a log line or an alert."""

    action: Action
    reason: str


def decide(local: Local, remote: Remote | None) -> Decision:
    """Decide what to do with ``local`` given what the bucket holds under its key.

    Objects are never overwritten. The same stored bytes, or the same plaintext stored another
    way (e.g. re-encrypted after Tier 1 was rebuilt), count as present; anything else under the
    key is a conflict. When the bucket's checksum cannot settle it (none stored, or a multipart
    checksum of other part sizes), the bytes must be compared.

    Args:
        local: the object on Tier 1.
        remote: the object in the bucket, or None when the key is free.

    Returns:
        The decision.
    """
    if remote is None:
        return Decision(Action.UPLOAD, "not in the bucket")
    if remote.size == local.size and same_checksum(remote.checksum, local.checksum):
        return Decision(Action.SKIP, "already in the bucket with the same checksum")
    if remote.sha256 is not None and remote.sha256 == local.sha256:
        return Decision(Action.SKIP, "already in the bucket with the same bytes")
    if local.plaintext_sha256 is not None and remote.plaintext_sha256 is not None:
        if remote.plaintext_sha256 == local.plaintext_sha256:
            return Decision(Action.SKIP, "already in the bucket with the same content")
        return Decision(
            Action.CONFLICT,
            f"the bucket holds other content (plaintext sha256 {remote.plaintext_sha256}, "
            f"Tier 1 has {local.plaintext_sha256})",
        )
    if remote.sha256 is None and (remote.checksum is None or "-" in remote.checksum):
        return Decision(Action.FETCH, "the bucket's checksum cannot settle it")
    found = f"sha256 {remote.sha256}" if remote.sha256 else f"checksum {remote.checksum}"
    return Decision(
        Action.CONFLICT,
        f"the bucket holds other bytes ({found}, {remote.size} bytes; Tier 1 has sha256 "
        f"{local.sha256}, {local.size} bytes)",
    )
