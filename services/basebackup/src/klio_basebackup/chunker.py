"""Files of the stream cut into fixed-size chunks, hashed, compressed and encrypted on a pool.

The event loop parses the stream and only gathers each chunk's pieces: one join per chunk, then
the chunk goes to a pool of ``jobs`` threads (HMAC, zstd and AES-GCM release the GIL). At most
``4 * jobs + 4`` chunks wait for the pool; the stream is read further only once there is room, so
memory stays bounded whatever the backup size.

No whole-file hash is computed: each chunk is named by a keyed hash of its bytes and stored with
the SHA-256 of its plaintext, the (authenticated) manifest lists every file's chunks in order, and
PostgreSQL's own ``backup_manifest`` (stored with the backup) carries a CRC32C of every file, which
``klio verify`` checks end to end as ``pg_verifybackup`` does. A third SHA-256 pass over every byte
cost a tenth of a backup's CPU and caught nothing those do not. (`FileEntry.sha256` stays in the
manifest format: backups that have one are still checked against it.)
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from klio_basebackup.stream import Member
from klio_common.catalog.backups import FileEntry
from klio_common.catalog.chunks import ChunkStore

_T = TypeVar("_T")


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
    chunks: list[Future[str]] = field(default_factory=list)
    pieces: list[memoryview] = field(default_factory=list)  # of the chunk being gathered
    gathered: int = 0  # bytes in ``pieces``
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
        self._files: list[tuple[Member, list[Future[str]]]] = []
        self._open: _OpenFile | None = None
        self._lock = threading.Lock()
        self._dirs: set[str] = set()
        self._seen: set[str] = set()  # ids this backup references (stored or trusted)
        self.written: list[str] = []  # ids this backup stored (not trusted from another)
        self._pool = ThreadPoolExecutor(jobs, thread_name_prefix="klio-chunks")
        self._inflight: deque[Future[str]] = deque()
        self._limit = 4 * jobs + 4
        self._closed = False

    # -- fed by the stream (event loop) ---------------------------------------------------------

    def member(self, member: Member) -> None:
        """A new member starts; directories and links are recorded as they are."""
        if member.path in self._dirs:
            return  # a tablespace directory we recorded ourselves, sent by a newer server too
        if member.type != "file":
            if member.type == "dir":
                self._dirs.add(member.path)
            self._files.append((member, []))
            return
        self._open = _OpenFile(member)

    def data(self, piece: memoryview) -> None:
        """Bytes of the open file, in order (kept by reference until their chunk is joined)."""
        f = self._open
        if f is None:
            return
        f.received += len(piece)
        room = self.chunk_size - f.gathered
        while len(piece) >= room:
            f.pieces.append(piece[:room])
            f.gathered += room
            self._submit(f)
            piece, room = piece[room:], self.chunk_size
        if piece:
            f.pieces.append(piece)
            f.gathered += len(piece)

    def member_end(self) -> None:
        """The open file is complete."""
        f = self._open
        if f is None:
            return
        if f.gathered:
            self._submit(f)
        self._open = None
        self.figures.size += f.received
        self._files.append((f.member, f.chunks))

    def add_file(self, member: Member, content: bytes) -> None:
        """A whole file at once (PostgreSQL's ``backup_manifest``)."""
        self.member(member)
        self.data(memoryview(content))
        self.member_end()

    async def pace(self) -> None:
        """Wait until few enough chunks are in flight; raise the first worker error."""
        await _drain(self._inflight, self._limit)

    def _submit(self, f: _OpenFile) -> None:
        # The one copy of the data on the loop: the pieces are views of the COPY messages.
        data = f.pieces[0].tobytes() if len(f.pieces) == 1 else b"".join(f.pieces)
        f.pieces, f.gathered = [], 0
        future = self._pool.submit(self._store_chunk, data)
        f.chunks.append(future)
        self._inflight.append(future)

    # -- workers --------------------------------------------------------------------------------

    def _store_chunk(self, data: bytes) -> str:
        chunk_id, sha256 = self.store.identify(data)
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
            stored = self.store.put(chunk_id, data, sha256=sha256)
        with self._lock:
            self.figures.chunks_total += 1
            self.figures.stored_size += stored
            if new:
                self.figures.chunks_new += 1
                self.figures.new_chunk_bytes += stored
                self.written.append(chunk_id)
        return chunk_id

    # -- end ------------------------------------------------------------------------------------

    async def finish(self) -> list[FileEntry]:
        """Wait for every chunk and return the file entries, in stream order.

        Raises:
            Exception: the first error of a worker (e.g. ``Retryable`` for a full volume).
        """
        await _drain(self._inflight, 0)
        entries = []
        for member, futures in self._files:
            entries.append(
                FileEntry(
                    path=member.path,
                    type=member.type,
                    size=member.size,
                    mode=member.mode,
                    mtime=member.mtime,
                    chunks=[f.result() for f in futures],
                    link_target=member.link_target,
                )
            )
        self.entries = entries
        return entries

    def discard(self, known: set[str]) -> int:
        """Delete the chunks this backup stored, but for ``known`` (referenced by committed
        backups); call after `close`, when the backup failed. Returns the bytes freed.

        Safe because backups of one cluster never run at once (one service replica, one backup
        at a time), so no other backup can have stored or trusted them meanwhile.
        """
        freed = 0
        for chunk_id in self.written:
            if chunk_id in known:
                continue
            path = self.store.path(chunk_id)
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
        self.written.clear()
        return freed

    async def close(self) -> None:
        """Stop the workers (pending chunks are dropped); safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        self._inflight.clear()


async def _drain(pending: deque[Future[_T]], limit: int) -> None:
    """Pop finished futures off the front (raising the first error) and wait for the oldest
    until at most ``limit`` remain; only a wait wraps a future for the event loop."""
    while pending and (len(pending) > limit or pending[0].done()):
        future = pending.popleft()
        if not future.done():
            await asyncio.wrap_future(future)
        future.result()


def manifest_member(size: int) -> Member:
    """The member for PostgreSQL's ``backup_manifest``, which arrives outside the tar archives."""
    return Member(
        path="backup_manifest", type="file", size=size, mode=0o600, mtime=int(time.time())
    )
