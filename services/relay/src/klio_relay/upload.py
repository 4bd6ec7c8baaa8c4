"""Copying one Tier-1 object to the bucket: check it, decide, upload, verify."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import msgspec

from klio_common.catalog.wal import ClusterIdentity
from klio_common.crypto import KeyRing
from klio_common.errors import ConflictError, CorruptObject, NotFound, Permanent, Retryable
from klio_common.objects import ObjectHeader, check_object
from klio_common.storage.layout import BucketLayout, Kind, kind_of
from klio_common.storage.s3 import (
    BucketUnavailable,
    ObjectInfo,
    S3Store,
    Stored,
    composite_checksum,
    part_size_for,
)
from klio_common.storage.tier2state import Tier2Entry
from klio_relay.dedupe import META_KIND, META_PLAINTEXT_SHA256, Action, Local, Remote, decide
from klio_relay.probe import BucketProbe
from klio_relay.state import RelayMetrics

log = logging.getLogger("klio.relay")

T = TypeVar("T")

_HEADER_KIND = {
    Kind.WAL: "wal",
    Kind.PARTIAL: "partial",
    Kind.HISTORY: "history",
    Kind.CHUNK: "chunk",
    Kind.MANIFEST: "manifest",
    Kind.DEDUP_KEY: "dedup-key",
}


@dataclass(frozen=True)
class Relayed:
    """One object that is now verified in the bucket.

    Attributes:
        entry: what the Tier-2 journal records for it.
        key: its key.
        uploaded: True when this call sent it, False when the bucket already had it.
        header: its object header (None for ``identity.json``).
    """

    entry: Tier2Entry
    key: str
    uploaded: bool
    header: ObjectHeader | None


class SingleFlight(Generic[T]):
    """Runs one task per key: a second caller for the same key awaits the first one's result."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[T]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` unless a run for ``key`` is under way; return (or raise) its outcome."""
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await work()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._running[key]


class Uploader:
    """Relays objects of one cluster's Tier-1 directory to the same relative keys in the bucket.

    Args:
        store: the bucket.
        layout: the cluster's keys.
        cluster_dir: ``<tier1>/<cluster>``.
        keyring: keys to open (and so check) every object before it is sent.
        metrics: the relay's metrics.
        probe: told about every success and bucket failure.
        slots: bounds the objects in flight across the whole relay.
        multipart_threshold: objects above this many bytes go up in parts.
        read_ahead: objects read and checked while they wait for a slot (memory bound).
    """

    def __init__(
        self,
        store: S3Store,
        layout: BucketLayout,
        cluster_dir: Path,
        keyring: KeyRing,
        metrics: RelayMetrics,
        probe: BucketProbe,
        slots: asyncio.Semaphore,
        multipart_threshold: int,
        read_ahead: int = 4,
    ) -> None:
        self.store = store
        self.layout = layout
        self.cluster_dir = cluster_dir
        self.keyring = keyring
        self.metrics = metrics
        self.probe = probe
        self.slots = slots
        self.multipart_threshold = multipart_threshold
        self.listed: set[str] = set()  # paths a bucket listing showed: HEAD before any PUT
        self._flights: SingleFlight[Relayed] = SingleFlight()
        self._ahead = asyncio.Semaphore(read_ahead)

    async def relay(self, path: str, *, head_first: bool = False) -> Relayed:
        """Make sure the object at ``path`` (relative to the cluster directory) is in the bucket.

        Args:
            path: e.g. ``wal/0000000100000000/000000010000000000000003``.
            head_first: ask the bucket before sending the bytes (the key is likely taken).

        Returns:
            What is now in the bucket.

        Raises:
            NotFound: the object is not on Tier 1.
            CorruptObject: it fails its checks on Tier 1 (it is never sent).
            ConflictError: the bucket holds other content under its key (never overwritten).
            BucketUnavailable: the bucket cannot be used now (retry later).
        """
        return await self._flights.run(path, lambda: self._relay(path, head_first))

    async def _relay(self, path: str, head_first: bool) -> Relayed:
        if not self.probe.ok:
            raise self.probe.error()
        # Reading and checking the next objects overlaps the uploads in flight; an object
        # holds its read-ahead place until it has an upload slot, which bounds memory.
        async with self._ahead:
            data, header, local = await asyncio.to_thread(self._prepare, path)
            await self.slots.acquire()
        try:
            return await self._send(path, data, header, local, head_first)
        except BucketUnavailable as exc:
            self.probe.failed(exc)
            raise
        finally:
            self.slots.release()

    def _prepare(self, path: str) -> tuple[bytes, ObjectHeader | None, Local]:
        data, header = self._read(path)
        return data, header, self._local(data, header)

    def _read(self, path: str) -> tuple[bytes, ObjectHeader | None]:
        kind = kind_of(path)
        if kind is None:
            raise Permanent(f"'{path}' is not an object the relay copies to Tier 2")
        file = self.cluster_dir / path
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{path} is not on Tier 1 ({file})") from None
        source = f"{path} on Tier 1 ({file})"
        if kind is Kind.IDENTITY:
            try:
                msgspec.json.decode(data, type=ClusterIdentity)
            except msgspec.DecodeError as exc:
                raise CorruptObject(f"{source} is corrupt: {exc}") from exc
            return data, None
        # Every frame's CRC and AEAD tag, and the header: a Tier-1 object damaged at rest must
        # never reach the bucket looking like a good one. (Restore and `klio verify` also
        # check the plaintext SHA-256; the bytes sent here are the stored bytes.)
        header = check_object(data, self.keyring, source=source)
        expected = path.rsplit("/", 1)[-1] if kind is not Kind.MANIFEST else path.split("/")[1]
        if header.kind != _HEADER_KIND[kind] or header.name != expected:
            raise CorruptObject(
                f"{source} holds {header.kind} {header.name}, not {_HEADER_KIND[kind]} {expected}",
                hint="the file was renamed or copied by hand; restore it from another copy",
            )
        return data, header

    def _local(self, data: bytes, header: ObjectHeader | None) -> Local:
        size = len(data)
        digest = hashlib.sha256(data).digest()  # once: it is both the journal's and S3's checksum
        if size > self.multipart_threshold:
            checksum = composite_checksum(data, part_size_for(size, self.multipart_threshold))
        else:
            checksum = base64.b64encode(digest).decode()
        return Local(
            size=size,
            sha256=digest.hex(),
            checksum=checksum,
            plaintext_sha256=header.plaintext_sha256 if header else None,
        )

    async def _send(
        self, path: str, data: bytes, header: ObjectHeader | None, local: Local, head_first: bool
    ) -> Relayed:
        key = self.layout.key(path)
        uploaded = False
        info: ObjectInfo | None = None
        if head_first or path in self.listed:
            info = await self.store.head(key)
        for _ in range(3):  # the key may be deleted between a refused PUT and our HEAD
            if info is None:
                stored = await self._put(key, data, header, path, local)
                uploaded = stored is not None
                if isinstance(stored, Stored) and await _proven(stored, local, data):
                    break  # no HEAD needed
                info = await self.store.head(key)
                if info is None:
                    continue
            decision = decide(local, Remote.of(info))
            if decision.action is Action.FETCH:
                remote = await self.store.get(key)
                sha = hashlib.sha256(remote).hexdigest()
                decision = decide(local, Remote.of(ObjectInfo(key, len(remote)), sha))
            if decision.action is Action.SKIP:
                break
            if decision.action is Action.CONFLICT:
                if uploaded:
                    # Our own upload does not read back as sent: corrupted on the way or
                    # replaced at once. Retrying settles which (a later PUT is refused).
                    raise Retryable(f"upload of {key} did not verify: {decision.reason}")
                raise ConflictError(  # counted once, where the failure is reported
                    f"object {key} in bucket '{self.store.bucket}' differs from {path} on "
                    f"Tier 1: {decision.reason}",
                    hint="the bucket copy was not overwritten; find out who wrote it (another "
                    "cluster with the same name and prefix?) before removing either copy",
                )
            info = None  # UPLOAD: gone since the HEAD; try again
        else:
            raise Retryable(f"{key} keeps vanishing from the bucket right after its upload")
        self.probe.succeeded()
        self.listed.discard(path)
        if uploaded:
            self.metrics.uploaded.inc()
        else:
            self.metrics.skipped.inc()
            log.debug("%s already in the bucket", key)
        return Relayed(Tier2Entry(path, local.sha256, local.size), key, uploaded, header)

    async def _put(
        self, key: str, data: bytes, header: ObjectHeader | None, path: str, local: Local
    ) -> Stored | bool | None:
        """Upload; None (or False, multipart) when the key is taken, else the server's answer."""
        kind = kind_of(path)
        metadata = {META_KIND: kind.value if kind else "unknown"}
        if header is not None and header.plaintext_sha256:
            metadata[META_PLAINTEXT_SHA256] = header.plaintext_sha256
        if len(data) > self.multipart_threshold:
            part = part_size_for(len(data), self.multipart_threshold)
            stored = await self.store.put_multipart_if_absent(
                key, data, part_size=part, metadata=metadata
            )
            return stored or None
        return await self.store.put_if_absent(key, data, metadata=metadata, checksum=local.checksum)


async def _proven(stored: Stored, local: Local, data: bytes) -> bool:
    """Whether the PUT's answer proves the bucket holds ``data`` as sent.

    A server that implements S3's checksums computes the SHA-256 of what it received, refuses
    the PUT when it differs from ours, and answers with it (AWS S3, MinIO, Ceph RGW, R2): the
    answer's checksum is that proof. One that ignores the header answers without it; its ETag
    is then the MD5 it computed of what it stored (unless the bucket encrypts with KMS keys),
    and our MD5 of ``data`` is only computed for that comparison. False: ask with a HEAD.
    """
    if stored.checksum_sha256 is not None:
        return stored.checksum_sha256 == local.checksum
    md5 = await asyncio.to_thread(hashlib.md5, data, usedforsecurity=False)
    return stored.verified(md5.digest())
