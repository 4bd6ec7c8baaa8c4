"""Files of the stream cut into fixed-size chunks, hashed, compressed and encrypted on a pool.

The event loop parses the stream and hands each full chunk to a thread pool of ``jobs`` threads
(HMAC, zstd and AES-GCM release the GIL); at most ``2 * jobs + 2`` chunks are in flight, and the
stream is only read further once there is room, so memory stays bounded whatever the backup size.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from klio_basebackup.stream import Member
from klio_common.catalog.backups import FileEntry
from klio_common.catalog.chunks import ChunkStore


@dataclass
class Figures:
    """Sizes of the backup so far (``chunks_total`` and ``stored_size`` count distinct chunks)."""

    size: int = 0
    stored_size: int = 0
    new_chunk_bytes: int = 0
    chunks_total: int = 0
    chunks_new: int = 0


@dataclass
class _OpenFile:
    member: Member
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    chunks: list[Future[str]] = field(default_factory=list)
    buffer: bytearray = field(default_factory=bytearray)
    received: int = 0


class Chunker:
    """Turns members and their bytes into `FileEntry` records, storing new chunks.

    Args:
        store: the cluster's chunk store.
        known: ids referenced by committed backups (the only chunks trusted without rewriting).
        chunk_size: bytes per chunk (a power of two, so chunks stay page-aligned).
        jobs: worker threads.
    """

    def __init__(self, store: ChunkStore, known: set[str], chunk_size: int, jobs: int) -> None:
        self.store = store
        self.known = known
        self.chunk_size = chunk_size
        self.figures = Figures()
        self.entries: list[FileEntry] = []
        self._files: list[tuple[Member, str, list[Future[str]]]] = []
        self._open: _OpenFile | None = None
        self._lock = threading.Lock()
        self._dirs: set[str] = set()
        self._seen: set[str] = set()  # ids this backup references (stored or trusted)
        self._pool = ThreadPoolExecutor(jobs, thread_name_prefix="klio-chunks")
        self._inflight: deque[asyncio.Future[str]] = deque()
        self._limit = 2 * jobs + 2
        self._closed = False

    # -- fed by the stream (event loop) ---------------------------------------------------------

    def member(self, member: Member) -> None:
        """A new member starts; directories and links are recorded as they are."""
        if member.path in self._dirs:
            return  # a tablespace directory we recorded ourselves, sent by a newer server too
        if member.type != "file":
            if member.type == "dir":
                self._dirs.add(member.path)
            self._files.append((member, "", []))
            return
        self._open = _OpenFile(member)

    def data(self, piece: memoryview) -> None:
        """Bytes of the open file, in order."""
        f = self._open
        if f is None:
            return
        f.hasher.update(piece)
        f.received += len(piece)
        pos = 0
        while pos < len(piece):
            take = min(self.chunk_size - len(f.buffer), len(piece) - pos)
            f.buffer += piece[pos : pos + take]
            pos += take
            if len(f.buffer) == self.chunk_size:
                self._submit(f)

    def member_end(self) -> None:
        """The open file is complete."""
        f = self._open
        if f is None:
            return
        if f.buffer:
            self._submit(f)
        self._open = None
        self.figures.size += f.received
        self._files.append((f.member, f.hasher.hexdigest(), f.chunks))

    def add_file(self, member: Member, content: bytes) -> None:
        """A whole file at once (PostgreSQL's ``backup_manifest``)."""
        self.member(member)
        self.data(memoryview(content))
        self.member_end()

    async def pace(self) -> None:
        """Wait until few enough chunks are in flight; raise the first worker error."""
        while len(self._inflight) > self._limit:
            await self._inflight.popleft()
        while self._inflight and self._inflight[0].done():
            self._inflight.popleft().result()

    def _submit(self, f: _OpenFile) -> None:
        data, f.buffer = f.buffer, bytearray()
        future = self._pool.submit(self._store_chunk, memoryview(data))
        f.chunks.append(future)
        self._inflight.append(asyncio.wrap_future(future))

    # -- workers --------------------------------------------------------------------------------

    def _store_chunk(self, data: memoryview) -> str:
        chunk_id = self.store.chunk_id(data)
        with self._lock:
            if chunk_id in self._seen:
                return chunk_id
            self._seen.add(chunk_id)
        stored = None
        if chunk_id in self.known:
            try:
                stored = self.store.path(chunk_id).stat().st_size
            except FileNotFoundError:
                stored = None  # referenced but gone: store it again rather than trust a hole
        new = stored is None
        if stored is None:
            stored = self.store.put(chunk_id, data)
        with self._lock:
            self.figures.chunks_total += 1
            self.figures.stored_size += stored
            if new:
                self.figures.chunks_new += 1
                self.figures.new_chunk_bytes += stored
        return chunk_id

    # -- end ------------------------------------------------------------------------------------

    async def finish(self) -> list[FileEntry]:
        """Wait for every chunk and return the file entries, in stream order.

        Raises:
            Exception: the first error of a worker (e.g. ``Retryable`` for a full volume).
        """
        while self._inflight:
            await self._inflight.popleft()
        entries = []
        for member, digest, futures in self._files:
            entries.append(
                FileEntry(
                    path=member.path,
                    type=member.type,
                    size=member.size,
                    mode=member.mode,
                    mtime=member.mtime,
                    chunks=[f.result() for f in futures],
                    sha256=digest,
                    link_target=member.link_target,
                )
            )
        self.entries = entries
        return entries

    async def close(self) -> None:
        """Stop the workers (pending chunks are dropped); safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        for fut in self._inflight:
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: the backup already failed with the first error
            fut.cancel()
        self._inflight.clear()


def manifest_member(size: int) -> Member:
    """The member for PostgreSQL's ``backup_manifest``, which arrives outside the tar archives."""
    return Member(
        path="backup_manifest", type="file", size=size, mode=0o600, mtime=int(time.time())
    )
