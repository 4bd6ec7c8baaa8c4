"""Tier-2 readers: one cluster's WAL, chunks, manifests and identity, from the bucket alone."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import msgspec

from klio_common.catalog.backups import BackupManifest, Lease
from klio_common.catalog.chunks import holds
from klio_common.catalog.wal import ClusterIdentity
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject, NotFound
from klio_common.objects import decode_object, read_header
from klio_common.pg.timeline import TimelineHistory
from klio_common.pg.walname import (
    WalSegment,
    history_name,
    is_history_name,
    is_partial_name,
    is_segment_name,
    parse_history_name,
)
from klio_common.storage.layout import DEDUP_KEY, IDENTITY, BucketLayout, chunk_path, wal_path

if TYPE_CHECKING:
    from klio_common.runtime.settings import S3Settings
    from klio_common.storage.s3 import S3Store


class Bucket:
    """Synchronous, thread-safe reads of one cluster's objects in the bucket.

    Wraps the shared async `S3Store` (same credentials chain, same errors: an unreachable
    endpoint, refused credentials or a missing bucket raise `BucketUnavailable`) on a private
    event loop thread, so the read path's worker threads share one client and its connections.
    The loop starts on the first request and stops with `close` (or at exit).

    Args:
        s3: ``tier2.s3``.
        cluster: the cluster name.
        attempts: tries per request.
        read_timeout: seconds to wait for an answer.
    """

    def __init__(
        self, s3: S3Settings, cluster: str, *, attempts: int = 3, read_timeout: float = 60.0
    ) -> None:
        self.settings = s3
        self.layout = BucketLayout.of(s3.prefix, cluster)
        self.where = f"s3://{s3.bucket}/{self.layout.cluster_prefix}"
        self._attempts = attempts
        self._read_timeout = read_timeout
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store: S3Store | None = None

    def key(self, relative: str) -> str:
        """The object key of a path relative to the cluster directory."""
        return self.layout.key(relative)

    def _run(self, make: Any) -> Any:
        with self._lock:
            if self._loop is None:
                # Imported here: aioboto3 costs ~0.4 s, and most wal-restore calls never need it.
                from klio_common.storage.s3 import S3Store

                self._store = S3Store(
                    self.settings, attempts=self._attempts, read_timeout=self._read_timeout
                )
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="klio-bucket", daemon=True
                )
                self._thread.start()
                atexit.register(self.close)
            loop, store = self._loop, self._store
        coro: Coroutine[Any, Any, Any] = make(store)
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def check(self) -> None:
        """One listing request: the bucket exists and the credentials may read it."""
        self._run(lambda s: s.check())

    def get(self, relative: str) -> bytes | None:
        """The bytes of the object at ``relative``, or None when the bucket does not hold it.

        Raises:
            BucketUnavailable: the bucket cannot be read now (never reported as "absent").
        """
        key = self.key(relative)
        try:
            data: bytes = self._run(lambda s: s.get(key))
        except NotFound:
            return None
        return data

    def list(self, relative_prefix: str) -> list[tuple[str, int]]:
        """(relative path, size) of every object under ``relative_prefix``, in key order."""
        prefix = self.layout.cluster_prefix + relative_prefix

        async def collect(store: S3Store) -> list[tuple[str, int]]:
            return [(self.layout.relative(i.key), i.size) async for i in store.list(prefix)]

        found: list[tuple[str, int]] = self._run(collect)
        return found

    def close(self) -> None:
        """Close the client and stop the loop thread (idempotent)."""
        with self._lock:
            loop, thread, store = self._loop, self._thread, self._store
            self._loop = self._thread = self._store = None
        if loop is None or thread is None or store is None:
            return
        atexit.unregister(self.close)
        try:
            asyncio.run_coroutine_threadsafe(store.close(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()


class BucketWal:
    """The WAL archive as the bucket holds it (same reads as `WalArchive`, nothing writes).

    Args:
        bucket: the cluster's bucket.
    """

    def __init__(self, bucket: Bucket) -> None:
        self.bucket = bucket
        self.cluster = bucket.layout.cluster
        self.where = bucket.where

    def read_identity(self) -> ClusterIdentity | None:
        """The cluster's ``identity.json`` from the bucket, or None when it is not there."""
        data = self.bucket.get(IDENTITY)
        if data is None:
            return None
        try:
            return msgspec.json.decode(data, type=ClusterIdentity)
        except msgspec.DecodeError as exc:
            raise CorruptObject(
                f"bucket object {self.bucket.key(IDENTITY)} is corrupt: {exc}",
                hint="copy identity.json from Tier 1 or another copy of the bucket",
            ) from exc

    def segment_size(self) -> int:
        """The WAL segment size recorded in the bucket's ``identity.json``.

        Raises:
            NotFound: the bucket holds nothing for this cluster.
        """
        ident = self.read_identity()
        if ident is None:
            raise NotFound(
                f"no WAL archive for cluster '{self.cluster}' in {self.where} (no identity.json)",
                hint="check tier2.s3.bucket, tier2.s3.prefix and --cluster; the relay copies "
                "identity.json with the first WAL it uploads",
            )
        return ident.wal_segment_size

    def read(self, name: str, keyring: KeyRing) -> bytes:
        """The verified plaintext of a WAL segment, closed partial or history file.

        Raises:
            NotFound: the bucket does not hold it.
            CorruptObject: the object fails its checks (the message names its key).
            BucketUnavailable: the bucket cannot be read now.
        """
        try:
            relative = wal_path(name)
        except ValueError as exc:
            raise NotFound(str(exc)) from None
        data = self.bucket.get(relative)
        if data is None:
            raise NotFound(f"WAL file {name} is not in {self.where}")
        key = self.bucket.key(relative)
        header, plaintext = decode_object(data, keyring, source=f"bucket object {key}")
        if header.name != name:
            raise CorruptObject(
                f"bucket object {key} holds {header.name}, not {name}",
                hint="the object was copied under the wrong key; do not use it",
            )
        return plaintext

    def read_history(self, timeline: int, keyring: KeyRing) -> TimelineHistory:
        """The parsed history file of ``timeline``."""
        text = self.read(history_name(timeline), keyring).decode()
        return TimelineHistory.parse(timeline, text)

    def stored_at(self, name: str) -> int:
        """When the segment was stored on Tier 1 (its header's ``created_at``, unix seconds)."""
        relative = wal_path(name)
        data = self.bucket.get(relative)
        if data is None:
            raise NotFound(f"WAL file {name} is not in {self.where}")
        return read_header(data, source=f"bucket object {self.bucket.key(relative)}").created_at

    def _names(self, under: str) -> list[str]:
        return [path.rsplit("/", 1)[-1] for path, _ in self.bucket.list(under)]

    def list_segments(self, seg_size: int | None = None) -> list[WalSegment]:
        """Complete segments in the bucket, sorted by (segno, timeline)."""
        size = seg_size or self.segment_size()
        segs = [WalSegment.parse(n, size) for n in self._names("wal/") if is_segment_name(n)]
        segs.sort(key=lambda s: (s.segno, s.timeline))
        return segs

    def list_partials(self) -> list[str]:
        """Closed ``.partial`` files in the bucket, sorted."""
        return sorted(n for n in self._names("wal/") if is_partial_name(n))

    def list_history(self) -> list[int]:
        """Timelines whose history file is in the bucket, ascending."""
        return sorted(
            parse_history_name(n) for n in self._names("wal/history/") if is_history_name(n)
        )


class BucketChunks:
    """The chunk store as the bucket holds it; every chunk is checked against its id.

    Ids are keyed with ``chunks/dedup.key`` fetched from the bucket (plain SHA-256 when the
    bucket has none, as without encryption).
    """

    def __init__(self, bucket: Bucket, keyring: KeyRing) -> None:
        self.bucket = bucket
        self.keyring = keyring
        self._lock = threading.Lock()
        self._key: bytes | None = None
        self._key_loaded = False

    def _dedup_key(self) -> bytes | None:
        with self._lock:
            if not self._key_loaded:
                data = self.bucket.get(DEDUP_KEY)
                if data is not None:
                    source = f"dedup key (bucket object {self.bucket.key(DEDUP_KEY)})"
                    _, self._key = decode_object(data, self.keyring, source=source)
                self._key_loaded = True
            return self._key

    def get(self, chunk_id: str, *, source: str = "") -> bytes:
        """The verified plaintext of a chunk.

        Raises:
            NotFound: the bucket does not hold it.
            CorruptObject: it fails its checks or does not match its id (names the key).
            BucketUnavailable: the bucket cannot be read now.
        """
        what = f"chunk {chunk_id}" + (f" of {source}" if source else "")
        relative = chunk_path(chunk_id)
        key = self.bucket.key(relative)
        blob = self.bucket.get(relative)
        if blob is None:
            raise NotFound(
                f"{what} is missing from the bucket (object {key})",
                hint="the bucket's copy of this backup is incomplete; use Tier 1 or another backup",
            )
        header, data = decode_object(blob, self.keyring, source=f"{what}: bucket object {key}")
        if header.name != chunk_id or not holds(self._dedup_key(), chunk_id, data, header):
            raise CorruptObject(
                f"{what}: bucket object {key} does not hold the content its id names",
                hint="do not use this backup from the bucket; restore from Tier 1 or another "
                "backup, and find out who wrote the object",
            )
        return data


class BucketBackups:
    """Committed backups in the bucket: ``backups/<id>/manifest`` (never leases)."""

    def __init__(self, bucket: Bucket, keyring: KeyRing) -> None:
        self.bucket = bucket
        self.keyring = keyring

    def ids(self) -> list[str]:
        """Ids of the backups in the bucket, sorted."""
        ids = []
        for path, _ in self.bucket.list("backups/"):
            parts = path.split("/")
            if len(parts) == 3 and parts[2] == "manifest":
                ids.append(parts[1])
        return sorted(ids)

    def load(self, backup_id: str) -> BackupManifest:
        """A backup's manifest from the bucket (decrypted and verified).

        Raises:
            NotFound: the bucket holds no such backup.
            CorruptObject: the manifest fails its checks.
        """
        relative = f"backups/{backup_id}/manifest"
        key = self.bucket.key(relative)
        blob = self.bucket.get(relative) if "/" not in backup_id else None
        if blob is None:
            raise NotFound(
                f"backup {backup_id} is not in {self.bucket.where}",
                hint="list the backups in the bucket with 'klio backup list --tier 2'",
            )
        what = f"manifest of backup {backup_id} (bucket object {key})"
        _, data = decode_object(blob, self.keyring, source=what)
        try:
            return msgspec.json.decode(data, type=BackupManifest)
        except msgspec.DecodeError as exc:
            raise CorruptObject(
                f"{what} is unreadable: {exc}",
                hint="do not use this backup from the bucket; use Tier 1 or another backup",
            ) from exc

    def manifests(self) -> list[BackupManifest]:
        """Every backup in the bucket, ordered by end time (never by name or timeline)."""
        ids = self.ids()
        with cf.ThreadPoolExecutor(8, thread_name_prefix="klio-manifests") as pool:
            manifests = list(pool.map(self.load, ids))
        manifests.sort(key=lambda m: (m.end_time, m.id))
        return manifests

    def leases(self) -> list[Lease]:
        """Backups in progress: the bucket never holds any."""
        return []
