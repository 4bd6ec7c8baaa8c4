"""The open WAL segment: plaintext in memory, an appendable ``.partial`` on disk, closing.

Durability rule: the position reported as flushed to the primary (which advances the slot) is never
past what is fsynced here — either inside a closed segment object or inside the open ``.partial``.
All disk work runs on ONE worker thread, in submission order, so closes and partial appends never
race and the durable position only moves forward. zstd, AES-GCM and SHA-256 release the GIL, so that
thread really runs beside the receive loop on the other core.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from klio_common import compression, fsio
from klio_common.catalog.wal import StoredObject, WalArchive
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.errors import ConflictError
from klio_common.objects import PartialWriter, read_partial
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment

PREALLOCATE = 4 << 20  # zeros kept ahead of a synchronous standby's frames (one fsync per 4 MiB)
MAX_PENDING_CLOSES = 4  # bounded memory: each pending close holds one segment's plaintext


@dataclass(frozen=True)
class ClosedSegment:
    """A segment (or an old timeline's closed ``.partial``) now durable in the archive."""

    name: str
    segment: WalSegment
    start_lsn: int
    end_lsn: int
    stored: StoredObject
    partial: bool


class SegmentWriter:
    """Writes one stream's WAL into the archive, segment by segment.

    Args:
        archive: the cluster's WAL archive.
        keyring: keys for encryption (active key) — may be the empty keyring.
        codec: the compression codec.
        seg_size: the server's wal_segment_size.
        on_closed: called on the worker thread, in order, after each segment is durable; it must
            make the announcement durable too (the outbox).
    """

    def __init__(
        self,
        archive: WalArchive,
        keyring: KeyRing,
        codec: Codec,
        seg_size: int,
        on_closed: Callable[[ClosedSegment], None],
        *,
        preallocate: int = 0,
    ) -> None:
        self.archive = archive
        self.preallocate = preallocate
        self.keyring = keyring
        self.codec = codec
        self.seg_size = seg_size
        self.on_closed = on_closed
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"klio-wal-{archive.cluster}")
        self._jobs: deque[Future[None]] = deque()
        self.seg: WalSegment | None = None
        self._buf = bytearray()
        self._spare: list[bytearray] = []  # recycled segment buffers: no page faults per segment
        self._received = 0  # bytes of the open segment received (contiguous from offset 0)
        self._submitted = 0  # bytes of the open segment handed to the worker for the .partial
        self._verify_until = 0  # bytes already durable from an earlier run: must match exactly
        self._part = _Partial(None, Path())
        self.durable = Lsn(0)  # everything below is fsynced in the archive
        self.received = Lsn(0)  # everything below has been received

    # -- opening ------------------------------------------------------------------------------

    def partial_path(self, seg: WalSegment) -> Path:
        """Where the open segment's ``.partial`` lives."""
        return self.archive.open_dir / f"{seg.name}.partial"

    def open(self, seg: WalSegment, *, resume: bool = False) -> None:
        """Start receiving ``seg`` from its first byte.

        With ``resume`` (first segment of a run), bytes left in its ``.partial`` by an earlier run
        are loaded; the re-received bytes must match them, and the durable position starts there.
        """
        self.seg = seg
        self._buf = self._spare.pop() if self._spare else bytearray(self.seg_size)
        self._received = self._submitted = self._verify_until = 0
        self._part = _Partial(seg, self.partial_path(seg))
        self.received = Lsn(seg.start_lsn)
        if not resume:
            return
        path = self._part.path
        valid_end = 0
        if path.exists():
            _, plain, valid_end = read_partial(path, self.keyring, source=f"open segment {path}")
            valid_end = min(valid_end, self.seg_size)
            self._buf[:valid_end] = plain[:valid_end]
            self._verify_until = self._submitted = valid_end
            self._rewrite_partial(valid_end)
        self.durable = Lsn(seg.start_lsn + valid_end)

    def _rewrite_partial(self, length: int) -> None:
        # A resumed partial gets a new data key (never reuse key+nonce after a torn frame); the
        # writer builds it under a temp name and its first sync replaces the old file atomically.
        part = self._part
        writer = PartialWriter.create(
            part.path,
            kind="partial",
            name=part.seg.name if part.seg else "",
            codec=compression.fast(self.codec),
            keyring=self.keyring,
            file_mode=self.archive.file_mode,
            dir_mode=self.archive.dir_mode,
            preallocate=self.preallocate,
        )
        if length:
            writer.append(0, memoryview(self._buf)[:length])
        writer.sync()
        part.writer = writer

    def stale_partials(self) -> list[Path]:
        """Open partials left by an earlier run (normally at most one)."""
        if not self.archive.open_dir.is_dir():
            return []
        return sorted(p for p in self.archive.open_dir.iterdir() if p.name.endswith(".partial"))

    # -- receiving ----------------------------------------------------------------------------

    async def write(self, start: int, data: memoryview) -> None:
        """Place WAL bytes that begin at LSN ``start``; closes segments as they fill."""
        while data:
            seg = self.seg
            assert seg is not None, "open() a segment first"
            offset = start - seg.start_lsn
            if offset != self._received:
                raise ConflictError(
                    f"replication stream jumped from {Lsn(seg.start_lsn + self._received)} "
                    f"to {Lsn(start)} in segment {seg.name}",
                    hint="this is a server or protocol error; the receiver will reconnect",
                )
            take = min(len(data), self.seg_size - offset)
            piece = data[:take]
            if offset < self._verify_until:
                upto = min(take, self._verify_until - offset)
                if self._buf[offset : offset + upto] != piece[:upto]:
                    raise ConflictError(
                        f"WAL received for {seg.name} at {Lsn(start)} differs from the bytes "
                        "already archived",
                        hint="split brain or a different cluster behind the same conninfo; the "
                        "archived bytes were kept; investigate before going on",
                    )
            self._buf[offset : offset + take] = piece
            self._received += take
            start += take
            data = data[take:]
            self.received = Lsn(start)
            if self._received == self.seg_size:
                await self._close_full()

    async def _close_full(self) -> None:
        seg = self.seg
        assert seg is not None
        buf, part = self._buf, self._part
        while len(self._jobs) >= MAX_PENDING_CLOSES:
            await asyncio.wrap_future(self._jobs[0])
            self.poll()
        self._submit(lambda: self._close_job(seg, buf, part, partial=False, end=seg.end_lsn))
        self.open(seg.next())

    async def close_partial(self, end: int) -> None:
        """End the open segment at ``end`` (timeline switch): keep it as ``<name>.partial``."""
        seg = self.seg
        if seg is None:
            return
        buf, part = self._buf, self._part
        buf[self._received :] = bytes(self.seg_size - self._received)  # zero padding, like pg
        self._submit(lambda: self._close_job(seg, buf, part, partial=True, end=end))
        self.seg = None
        await self.drain()

    def _close_job(
        self,
        seg: WalSegment,
        buf: bytearray,
        part: _Partial,
        *,
        partial: bool,
        end: int,
    ) -> None:
        name = f"{seg.name}.partial" if partial else seg.name
        extra = {"end_lsn": str(Lsn(end))} if partial else None
        stored = self.archive.store_segment(
            name, memoryview(buf), codec=self.codec, keyring=self.keyring, extra=extra
        )
        part.close()
        path = part.path
        if path.exists():
            path.unlink()
            fsio.fsync_dir(path.parent)
        closed = ClosedSegment(name, seg, seg.start_lsn, end, stored, partial)
        self.on_closed(closed)
        self.durable = Lsn(max(self.durable, end))
        if len(self._spare) < 2:
            self._spare.append(buf)  # no job refers to it any more: the next segment reuses it

    # -- flushing -----------------------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(self._pool.submit(job))

    def poll(self) -> None:
        """Reap finished worker jobs; re-raise the first failure."""
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()

    async def flush(self, *, inline: bool = False) -> Lsn:
        """Make everything received durable (append to the ``.partial`` and fsync); return it.

        With ``inline`` (synchronous standby: a COMMIT waits for this) and nothing queued for the
        worker, the append and fsync run right here, saving two thread hand-offs per commit.
        """
        seg = self.seg
        if seg is not None and self._received > self._submitted:
            lo, hi = self._submitted, self._received
            self._submitted = hi
            buf, part = self._buf, self._part
            if inline and not self._jobs:
                self._append_job(part, buf, lo, hi)
            else:
                self._submit(lambda: self._append_job(part, buf, lo, hi))
        await self.drain()
        return self.durable

    async def drain(self) -> None:
        """Wait for every submitted job."""
        while self._jobs:
            await asyncio.wrap_future(self._jobs[0])
            self.poll()

    def _append_job(self, part: _Partial, buf: bytearray, lo: int, hi: int) -> None:
        if part.closed:
            return  # the segment was closed meanwhile: its object holds these bytes
        if part.writer is None:
            part.writer = PartialWriter.create(
                part.path,
                kind="partial",
                name=part.seg.name if part.seg else "",
                codec=compression.fast(self.codec),  # rewritten at self.codec's level on close
                keyring=self.keyring,
                file_mode=self.archive.file_mode,
                dir_mode=self.archive.dir_mode,
                preallocate=self.preallocate,
            )
        part.writer.append(lo, memoryview(buf)[lo:hi])
        part.writer.sync()
        assert part.seg is not None
        self.durable = Lsn(max(self.durable, part.seg.start_lsn + hi))

    def close(self) -> None:
        """Stop the worker (pending jobs finish first)."""
        self._pool.shutdown(wait=True)
        self._part.close()


class _Partial:
    """The on-disk ``.partial`` of one open segment; touched only by the worker thread."""

    def __init__(self, seg: WalSegment | None, path: Path) -> None:
        self.seg = seg
        self.path = path
        self.writer: PartialWriter | None = None
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.writer is not None:
            self.writer.close()
            self.writer = None
