"""The open WAL segment: plaintext in memory, an appendable ``.partial`` on disk, closing.

Durability rule: the position reported as flushed to the primary (which advances the slot) is never
past what is fsynced here — either inside a closed segment object or inside the open ``.partial``.
Closing segments runs on ONE worker thread, in submission order; zstd, AES-GCM and SHA-256 release
the GIL, so it really runs beside the receive loop on the other core. Asynchronous streams append to
the ``.partial`` on that worker too. A synchronous standby's streaming thread appends to the open
segment's own ``.partial`` itself (`flush_here`), a file the worker never touches, and a full
segment's last bytes go into its ``.partial`` before its close is queued, so the durable position
never depends on a close still running. It only moves forward (`_advance`, under a lock).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from klio_common import compression, fsio
from klio_common.catalog.wal import WalArchive
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.errors import ConflictError, KlioError, Retryable
from klio_common.partial import PartialWriter, SyncTail, read_partial
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_wal_receiver.announcer import ClosedSegment

PREALLOCATE_MARGIN = 1 << 20  # zeros beyond a segment in a synchronous .partial (frame overhead)
MAX_PENDING_CLOSES = 4  # bounded memory: each pending close holds one segment's plaintext


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
        synchronous: bool = False,
    ) -> None:
        self.archive = archive
        # A synchronous standby appends a frame per commit, and a COMMIT waits for each: its
        # frames are not compressed (zstd costs more CPU on a few KiB than it saves, and the
        # segment's object is compressed when it closes) and its .partial is zero-filled to a
        # whole segment up front, as pg_receivewal pads its files, so each sync is a data-only
        # fdatasync (see PartialWriter).
        self.synchronous = synchronous
        self.partial_codec = compression.get("none") if synchronous else compression.fast(codec)
        self.preallocate = seg_size + PREALLOCATE_MARGIN if synchronous else 0
        self._prepared: tuple[WalSegment, Future[PartialWriter]] | None = None
        self._lock = threading.Lock()  # `durable` moves forward from two threads
        self.keyring = keyring
        self.codec = codec
        self.seg_size = seg_size
        self.on_closed = on_closed
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"klio-wal-{archive.cluster}")
        self._jobs: deque[Future[None]] = deque()
        self._failed = False  # a job failed: the worker runs none after it
        self.seg: WalSegment | None = None
        self._base = 0  # the open segment's first LSN
        self._buf = bytearray()
        self._spare: list[bytearray] = []  # recycled segment buffers: no page faults per segment
        self._received = 0  # bytes of the open segment received (contiguous from offset 0)
        self._submitted = 0  # bytes of the open segment handed to the worker for the .partial
        self._verify_until = 0  # bytes already durable from an earlier run: must match exactly
        self._part = _Partial(None, Path())
        self.durable = 0  # LSN: everything below is fsynced in the archive
        self.received = 0  # LSN: everything below has been received

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
        self._base = int(seg.start_lsn)
        self._buf = self._spare.pop() if self._spare else bytearray(self.seg_size)
        self._received = self._submitted = self._verify_until = 0
        self._part = _Partial(seg, self.partial_path(seg))
        self.received = seg.start_lsn
        if self.synchronous:
            writer = self._take_prepared(seg)
            if writer is not None and resume:
                writer.abandon()  # the .partial left by the earlier run is rewritten instead
            elif writer is not None:
                self._part.writer = writer
            nxt = seg.next()  # its .partial is created and zero-filled while this one fills
            self._prepared = (nxt, self._pool.submit(self._new_partial_writer, nxt))
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
        self.durable = seg.start_lsn + valid_end

    def _rewrite_partial(self, length: int) -> None:
        # A resumed partial gets a new data key (never reuse key+nonce after a torn frame); the
        # writer builds it under a temp name and its first sync replaces the old file atomically.
        part = self._part
        assert part.seg is not None
        writer = self._new_partial_writer(part.seg)
        if length:
            writer.append(0, memoryview(self._buf)[:length])
        writer.sync()
        part.writer = writer

    def _new_partial_writer(self, seg: WalSegment) -> PartialWriter:
        return PartialWriter.create(
            self.partial_path(seg),
            kind="partial",
            name=seg.name,
            codec=self.partial_codec,  # rewritten at self.codec's level on close
            keyring=self.keyring,
            file_mode=self.archive.file_mode,
            dir_mode=self.archive.dir_mode,
            preallocate=self.preallocate,
            direct=self.synchronous,
        )

    def _take_prepared(self, seg: WalSegment) -> PartialWriter | None:
        """The writer prepared for ``seg`` on the worker (waited for), or None."""
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return None
        if prepared[0] != seg:
            prepared[1].add_done_callback(_abandon)
            return None
        try:
            return prepared[1].result()
        except (KlioError, OSError):
            return None  # created on first use instead, where the error is reported

    # -- receiving ----------------------------------------------------------------------------

    async def write(self, start: int, data: memoryview) -> None:
        """Place WAL bytes that begin at LSN ``start``; closes segments as they fill."""
        while data:
            start, data = self._place(start, data)
            if self._received == self.seg_size:
                while len(self._jobs) >= MAX_PENDING_CLOSES:
                    await asyncio.wrap_future(self._jobs[0])
                    self.poll()
                self._close_full()

    def put(self, start: int, data: memoryview) -> None:
        """`write` for the streaming thread (`pump.SyncPump`): waits for the worker by blocking."""
        offset = start - self._base
        end = offset + len(data)
        if offset == self._received and self._verify_until <= offset and end < self.seg_size:
            self._buf[offset:end] = data  # the common case, kept short: once per commit
            self._received = end
            self.received = start + end - offset
            return
        while data:
            start, data = self._place(start, data)
            if self._received == self.seg_size:
                while len(self._jobs) >= MAX_PENDING_CLOSES:
                    self._jobs[0].result()
                    self.poll()
                self._close_full()

    def _place(self, start: int, data: memoryview) -> tuple[int, memoryview]:
        """Copy what of ``data`` fits in the open segment; return where the rest starts, and it."""
        seg = self.seg
        assert seg is not None, "open() a segment first"
        offset = start - self._base
        if offset != self._received:
            raise ConflictError(
                f"replication stream jumped from {Lsn(seg.start_lsn + self._received)} "
                f"to {Lsn(start)} in segment {seg.name}",
                hint="this is a server or protocol error; the receiver will reconnect",
            )
        take = min(len(data), self.seg_size - offset)
        if offset < self._verify_until:
            upto = min(take, self._verify_until - offset)
            if self._buf[offset : offset + upto] != data[:upto]:
                raise ConflictError(
                    f"WAL received for {seg.name} at {Lsn(start)} differs from the bytes "
                    "already archived",
                    hint="split brain or a different cluster behind the same conninfo; the "
                    "archived bytes were kept; investigate before going on",
                )
        end = offset + take
        self._buf[offset:end] = data[:take] if take < len(data) else data
        self._received = end
        self.received = start + take
        return start + take, data[take:]

    def _close_full(self) -> None:
        seg = self.seg
        assert seg is not None
        buf, part = self._buf, self._part
        if self.synchronous and self._submitted < self.seg_size:
            # The tail goes into the .partial now, so the next segment's commits never wait for
            # this one's object (compressed and encrypted on the worker meanwhile).
            self._append_job(part, buf, self._submitted, self.seg_size)
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
        self._advance(end)
        if len(self._spare) < 2:
            self._spare.append(buf)  # no job refers to it any more: the next segment reuses it

    # -- flushing -----------------------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(self._pool.submit(self._run, job))

    def _run(self, job: Callable[[], None]) -> None:
        # After a failed job (a close that found the volume full...), the jobs queued behind it
        # must not run: an append to the next segment would make WAL durable beyond a segment
        # the archive does not hold, and the stream would resume past the hole.
        if self._failed:
            raise Retryable(
                "not written: an earlier write to the archive of this stream failed",
                hint="the stream restarts from what the archive holds",
            )
        try:
            job()
        except BaseException:
            self._failed = True
            raise

    def poll(self) -> None:
        """Reap finished worker jobs; re-raise the first failure."""
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()

    async def flush(self) -> int:
        """Make everything received durable (append to the ``.partial`` and fsync); return it."""
        if self.seg is not None and self._received > self._submitted:
            lo, hi = self._submitted, self._received
            self._submitted = hi
            buf, part = self._buf, self._part
            self._submit(lambda: self._append_job(part, buf, lo, hi))
        await self.drain()
        return self.durable

    def flush_here(self) -> int:
        """`flush` for a synchronous standby's streaming thread (`pump.SyncPump`).

        The append and fsync run right here, on the open segment's own ``.partial``: the worker
        only closes earlier segments and prepares the next one, so nothing waits for it.
        """
        if self._jobs and self._jobs[0].done():
            self.poll()
        lo, hi = self._submitted, self._received
        if hi <= lo or self.seg is None:
            return self.durable
        self._submitted = hi
        writer = self._part.writer
        if writer is None:
            self._append_job(self._part, self._buf, lo, hi)
            return self.durable
        writer.append_sync(lo, memoryview(self._buf)[lo:hi])
        # No lock: while the pump runs, only its thread moves `durable` past a segment's start.
        # The worker's closes end at a segment's end, which this thread made durable (the tail
        # went into the .partial) before it queued the close (see _close_full).
        self.durable = self._base + hi
        return self.durable

    # -- the pump's native turn (`native.NativeTurn`) ------------------------------------------

    def native_tail(self) -> tuple[bytearray, SyncTail, int, int, int] | None:
        """For a native turn, when it can append as `flush_here`'s short path would: the open
        segment's buffer, its ``.partial``'s state, first LSN, bytes received, and bytes that
        must match (resumed); else None. Reaps the worker first."""
        if self._jobs and self._jobs[0].done():
            self.poll()
        writer = self._part.writer
        if self.seg is None or writer is None or self._submitted < self._received:
            return None
        tail = writer.sync_tail()
        if tail is None:
            return None
        return self._buf, tail, self._base, self._received, self._verify_until

    def advanced(self, received: int, durable: int) -> None:
        """A native turn received the open segment up to offset ``received`` and made it
        durable (appended to its ``.partial`` and synced) up to offset ``durable``."""
        self._received, self.received = received, self._base + received
        if durable > self._submitted:
            self._submitted = durable
            # No lock, as in flush_here: only the pump's thread moves `durable` in a segment.
            self.durable = self._base + durable

    async def drain(self) -> None:
        """Wait for every submitted job."""
        while self._jobs:
            await asyncio.wrap_future(self._jobs[0])
            self.poll()

    def _append_job(self, part: _Partial, buf: bytearray, lo: int, hi: int) -> None:
        if part.closed:
            return  # the segment was closed meanwhile: its object holds these bytes
        assert part.seg is not None
        if part.writer is None:
            part.writer = self._new_partial_writer(part.seg)
        part.writer.append_sync(lo, memoryview(buf)[lo:hi])
        self._advance(part.seg.start_lsn + hi)

    def _advance(self, lsn: int) -> None:
        with self._lock:
            if lsn > self.durable:
                self.durable = lsn

    def close(self) -> None:
        """Stop the worker (pending jobs finish first)."""
        self._pool.shutdown(wait=True)
        self._part.close()
        if self._prepared is not None:
            _abandon(self._prepared[1])
            self._prepared = None


def _abandon(prepared: Future[PartialWriter]) -> None:
    """Remove a prepared writer's unpublished file (it was never used)."""
    if prepared.exception() is None:
        prepared.result().abandon()


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
