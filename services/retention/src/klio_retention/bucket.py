"""Tier 2 as retention sees it: the bucket's catalog of one cluster, object locks, deletions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import botocore.exceptions
import msgspec

from klio_common.catalog.backups import BackupManifest
from klio_common.catalog.wal import ClusterIdentity
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject
from klio_common.objects import decode_object
from klio_common.pg.timeline import TimelineHistory
from klio_common.pg.walname import parse_history_name
from klio_common.storage.layout import BucketLayout, Kind, kind_of
from klio_common.storage.s3 import S3Store
from klio_retention.snapshot import ChunkEntry, Snapshot, backup_entry, wal_entry

_PARALLEL = 8
_REFUSED = {"AccessDenied", "InvalidRequest", "MethodNotAllowed"}


@dataclass(frozen=True)
class Listed:
    """One object of the cluster: path relative to the cluster prefix, size, last modified."""

    path: str
    size: int
    modified: float


class Bucket:
    """One cluster's objects in the bucket.

    Args:
        store: the bucket.
        layout: the cluster's keys.
        keyring: keys to open manifests and history files.
    """

    def __init__(self, store: S3Store, layout: BucketLayout, keyring: KeyRing) -> None:
        self.store = store
        self.layout = layout
        self.keyring = keyring

    async def _request(self, op: str, what: str, **params: Any) -> Any:
        try:
            # S3Store has no call for the lock headers, the lock configuration or a listing
            # with modification times: its request wrapper maps transport errors for us.
            return await self.store.call(op, what, **params)
        except botocore.exceptions.ClientError as exc:
            raise self.store.client_error(exc, what) from exc

    async def listing(self) -> list[Listed]:
        """Every object under the cluster's prefix."""
        found: list[Listed] = []
        params: dict[str, Any] = {"Prefix": self.layout.cluster_prefix}
        while True:
            page = await self._request("list_objects_v2", "listing the cluster", **params)
            for item in page.get("Contents", []):
                modified = item.get("LastModified")
                stamp = modified.timestamp() if isinstance(modified, datetime) else 0.0
                found.append(Listed(self.layout.relative(item["Key"]), int(item["Size"]), stamp))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return found
            params["ContinuationToken"] = token

    async def _object(self, path: str, kind: str) -> tuple[bytes, bytes]:
        data = await self.store.get(self.layout.key(path))
        _, plaintext = decode_object(data, self.keyring, source=f"{kind} {path} in the bucket")
        return data, plaintext

    async def snapshot(self, protected_chunks: frozenset[str]) -> Snapshot:
        """The bucket's catalog of the cluster (manifests and history files are read).

        Args:
            protected_chunks: chunks Tier-1 backups reference (never deleted from the bucket:
                the relay may still send a backup that needs them).
        """
        listed = await self.listing()
        cluster = self.layout.cluster
        kinds = {item.path: kind_of(item.path) for item in listed}
        if "identity.json" not in kinds:
            return Snapshot(tier=2, cluster=cluster, seg_size=16 << 20)
        ident = msgspec.json.decode(
            await self.store.get(self.layout.identity_key), type=ClusterIdentity
        )
        snap = Snapshot(
            tier=2,
            cluster=cluster,
            seg_size=ident.wal_segment_size,
            protected_chunks=protected_chunks,
        )
        manifests: list[Listed] = []
        histories: list[Listed] = []
        for item in listed:
            kind = kinds[item.path]
            name = item.path.rsplit("/", 1)[-1]
            if kind in (Kind.WAL, Kind.PARTIAL):
                snap.wal.append(wal_entry(name, snap.seg_size, item.size))
            elif kind == Kind.CHUNK:
                snap.chunks.append(ChunkEntry(name, item.size, item.modified))
            elif kind == Kind.MANIFEST:
                manifests.append(item)
            elif kind == Kind.HISTORY:
                histories.append(item)

        async def manifest(item: Listed) -> None:
            _, plaintext = await self._object(item.path, "manifest")
            try:
                decoded = msgspec.json.decode(plaintext, type=BackupManifest)
            except msgspec.DecodeError as exc:
                raise CorruptObject(f"manifest {item.path} in the bucket: {exc}") from exc
            snap.backups.append(backup_entry(decoded, item.size))

        async def history(item: Listed) -> None:
            name = item.path.rsplit("/", 1)[-1]
            _, plaintext = await self._object(item.path, "history file")
            tli = parse_history_name(name)
            try:
                snap.histories[tli] = TimelineHistory.parse(tli, plaintext.decode())
            except (ValueError, UnicodeDecodeError):
                return  # unknown ancestry: WAL is then only cut on the timeline itself

        await _bounded([partial(manifest, i) for i in manifests])
        await _bounded([partial(history, i) for i in histories])
        return snap

    async def lock_enabled(self) -> bool:
        """Whether the bucket has object lock (then every object is checked before deletion)."""
        try:
            answer = await self.store.call(
                "get_object_lock_configuration", "reading the object lock configuration"
            )
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code == "ObjectLockConfigurationNotFoundError":
                return False
            if code in _REFUSED:
                return True  # cannot tell: check each object
            raise self.store.client_error(exc, "reading the object lock configuration") from exc
        config = answer.get("ObjectLockConfiguration") or {}
        return bool(config.get("ObjectLockEnabled") == "Enabled")

    async def locks(self, paths: Iterable[str], now: datetime) -> dict[str, str]:
        """Which of ``paths`` are under object lock now: path → why."""
        found: dict[str, str] = {}

        async def probe(path: str) -> None:
            try:
                head = await self.store.call(
                    "head_object", f"checking {path}", Key=self.layout.key(path)
                )
            except botocore.exceptions.ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    return
                raise self.store.client_error(exc, f"checking {path}") from exc
            why = lock_reason(head, now)
            if why is not None:
                found[path] = why

        await _bounded([partial(probe, p) for p in paths])
        return found

    async def delete(self, path: str) -> str | None:
        """Delete one object; return None when done, or why the bucket refused (not an error).

        In a versioned bucket this adds a delete marker: the bucket's lifecycle rules free
        the old version once its object lock allows.
        """
        key = self.layout.key(path)
        try:
            await self.store.call("delete_object", f"deleting {key}", Key=key)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _REFUSED:
                return f"the bucket refused the deletion ({code}): object lock or bucket policy"
            raise self.store.client_error(exc, f"deleting {key}") from exc
        return None

    async def delete_many(self, paths: list[str]) -> dict[str, str]:
        """Delete ``paths`` a few at a time; return those the bucket refused, with why."""
        refused: dict[str, str] = {}

        async def one(path: str) -> None:
            why = await self.delete(path)
            if why is not None:
                refused[path] = why

        await _bounded([partial(one, p) for p in paths])
        return refused


def lock_reason(head: dict[str, Any], now: datetime) -> str | None:
    """Why a HEAD answer says the object cannot be deleted now, or None."""
    if str(head.get("ObjectLockLegalHoldStatus", "")).upper() == "ON":
        return "under an object lock legal hold"
    until = head.get("ObjectLockRetainUntilDate")
    if isinstance(until, datetime) and until.astimezone(UTC) > now:
        mode = head.get("ObjectLockMode") or "retention"
        return f"under object lock ({mode}) until {until.astimezone(UTC).isoformat()}"
    return None


async def _bounded(jobs: list[Callable[[], Awaitable[None]]]) -> None:
    slots = asyncio.Semaphore(_PARALLEL)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with slots:
            await job()

    results = await asyncio.gather(*(run(j) for j in jobs), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
