"""Open objects: the ``.partial`` of a WAL segment being received, appended frame by frame.

The other half of the object format (`klio_common.objects`): an open object's header has no
plaintext size and no last frame; each append is a frame of its own, authenticated like any
other, so a reader (`read_partial`) keeps every frame up to a torn or unsynced tail. It is built
of the same parts as complete objects: the header, frames and sealing of `klio_common.frames`.
"""

from __future__ import annotations

import errno
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from klio_common import fsio
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.directio import BLOCK, DirectTail
from klio_common.errors import CorruptObject, KlioError
from klio_common.frames import (
    FLAG_LAST,
    FRAME_HEAD,
    MAX_PLAINTEXT_SIZE,
    BadFrame,
    Frame,
    ObjectHeader,
    Sealer,
    corrupt,
    new_header,
    opener,
    parse_header,
)
from klio_common.objects import decode_object


def read_partial(
    path: Path, keyring: KeyRing, *, source: str, max_size: int = MAX_PLAINTEXT_SIZE
) -> tuple[ObjectHeader, bytearray, int]:
    """Read an open partial written by :class:`PartialWriter` (or a complete object).

    Returns:
        The header; the plaintext, zero-filled where no frame wrote, as long as
        the highest frame end; ``valid_end``, the end of the contiguous range that
        starts at the first frame's offset (0 without frames).

    A torn or unauthenticated last frame (a crash mid-append: never synced, so
    never acknowledged) is dropped; damage to any earlier frame raises.

    A reader racing the writer's append can see a frame's later pages before its header's: the
    file is then read once more, and damage at rest reads the same the second time.

    Raises:
        CorruptObject: damaged header or damage before the last frame.
        EncryptionKeyError: the key is not configured or is the wrong key.
    """
    try:
        return _read_partial(Path(path).read_bytes(), keyring, source, max_size)
    except CorruptObject:
        return _read_partial(Path(path).read_bytes(), keyring, source, max_size)


def _read_partial(
    data: bytes, keyring: KeyRing, source: str, max_size: int
) -> tuple[ObjectHeader, bytearray, int]:
    view = memoryview(data)
    header, head, pos = parse_header(view, source)
    if header.plaintext_size is not None:
        plain = decode_object(data, keyring, source=source, max_size=max_size)[1]
        return header, bytearray(plain), len(plain)
    frames: list[Frame] = []
    try:
        for frame in opener(header, head, keyring, source).frames(
            view, pos, max_size, 2 * max_size
        ):
            if frame.flags & FLAG_LAST:
                raise corrupt(source, f"frame {frame.index} is flagged last in an open partial")
            frames.append(frame)
    except BadFrame as bad:
        if not bad.torn(data):
            raise corrupt(source, f"frame {bad.index} {bad.reason}") from None
    plaintext = bytearray(max((f.offset + len(f.plain) for f in frames), default=0))
    for f in frames:
        plaintext[f.offset : f.offset + len(f.plain)] = f.plain
    valid_end = frames[0].offset if frames else 0
    for f in sorted(frames, key=lambda f: f.offset):
        if frames[0].offset <= f.offset <= valid_end:
            valid_end = max(valid_end, f.offset + len(f.plain))
    return header, plaintext, valid_end


_dsync = {"flags": getattr(os, "RWF_DSYNC", 0)}  # 0 once the kernel or filesystem refused it


def _pwritev_dsync(fd: int, parts: list[bytes | memoryview], offset: int) -> int:
    """``pwritev`` with ``RWF_DSYNC``: the write and its ``fdatasync`` in one system call.

    A kernel or filesystem that refuses the flag (nothing is written then) gets a plain write
    and an ``fdatasync``, from then on.
    """
    if _dsync["flags"]:
        try:
            return os.pwritev(fd, parts, offset, _dsync["flags"])
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        _dsync["flags"] = 0
    written = os.pwritev(fd, parts, offset)
    os.fdatasync(fd)
    return written


@dataclass(frozen=True, slots=True)
class SyncTail:
    """A ``.partial``'s state for a native `PartialWriter.append_sync` (see `sync_tail`)."""

    writer: PartialWriter
    direct: DirectTail
    key: bytes | None  # None: frames are not encrypted (a CRC-32 covers the payload)
    prefix: bytes
    digest: bytes
    size: int
    allocated: int
    index: int
    frame_size: int

    @property
    def capacity(self) -> int:
        """The largest frame the direct tail takes."""
        return self.direct.capacity


class PartialWriter:
    """Appends authenticated frames to an open segment (``.partial``) as WAL arrives.

    The file is built under a temp name; the first :meth:`sync` renames it over
    ``path`` (so a partial being re-created replaces the old one atomically).
    Every writer has its own data key, so (key, nonce) pairs never repeat.
    After a failed write the writer refuses further use: create a new one.

    With ``preallocate`` (a synchronous standby, where a COMMIT waits for every sync), the
    file is zero-filled that far ahead of the frames, so a sync only has data to flush
    (``fdatasync``, no size or extent change to journal). Readers stop at the zeros after the
    last frame, as after a torn write (`read_partial`). With ``direct`` too, `append_sync`
    writes with ``O_DIRECT`` where the file system allows it (`klio_common.directio`).
    """

    def __init__(
        self, path: Path, sealer: Sealer, codec: Codec, fd: int, tmp: Path, frame_size: int
    ) -> None:
        self.path, self._sealer, self._codec, self._fd, self._tmp = path, sealer, codec, fd, tmp
        self._frame_size, self._size, self._index = frame_size, 0, 0
        self._published = self._closed = self._failed = False
        self._ready = False  # append_sync's short path applies: published, raw, sound
        self._ahead = self._allocated = 0  # zero-filled bytes: how many to keep ahead, up to
        self._direct: DirectTail | None = None  # append_sync's direct writes, once probed
        self._want_direct = False  # probe for direct I/O at the first zero-fill

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        kind: str = "partial",
        name: str,
        codec: Codec,
        keyring: KeyRing,
        file_mode: int = 0o640,
        dir_mode: int = 0o750,
        frame_size: int = 1 << 20,
        preallocate: int = 0,
        direct: bool = False,
    ) -> PartialWriter:
        """Start a partial object at ``path`` (not visible there before the first sync)."""
        path = Path(path)
        header, data_key = new_header(
            kind=kind, name=name, codec=codec, keyring=keyring, size=None, sha=None, extra=None
        )
        sealer = Sealer(header, data_key)
        fsio.ensure_dir(path.parent, dir_mode)
        tmp = fsio.temp_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, file_mode)
        writer = cls(path, sealer, codec, fd, tmp, frame_size)
        writer._want_direct = direct and preallocate > 0
        try:
            os.fchmod(fd, file_mode)
            writer._write([sealer.head])
            writer._ahead = preallocate
            # The zeros after the header, synced with it: a first direct append may then
            # publish the file as is, without a read of the header's block (`holds`).
            writer._reserve()
            if writer._direct is not None:
                head = sealer.head
                start = len(head) - len(head) % BLOCK
                writer._direct.holds(start, head[start:])
        except BaseException:
            writer._discard()
            raise
        return writer

    @property
    def header_size(self) -> int:
        """Bytes taken by the header at the start of the file."""
        return len(self._sealer.head)

    @property
    def direct_io(self) -> bool:
        """Whether `append_sync` writes with ``O_DIRECT`` (probed at the first zero-fill)."""
        return self._direct is not None

    def append(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (plaintext at ``offset`` in the segment) as one or more frames."""
        self._check()
        view = memoryview(data).cast("B")
        parts: list[bytes | memoryview] = []
        for start in range(0, len(view), self._frame_size):
            piece = view[start : start + self._frame_size]
            payload = self._codec.compress(piece)
            parts += self._sealer.seal(self._index, 0, offset + start, len(piece), payload)
            self._index += 1
        self._write(parts)

    def append_sync(self, offset: int, data: memoryview) -> None:
        """`append` then `sync`: a synchronous standby's per-commit path, kept short.

        One frame, one ``pwritev`` into the zero-filled space with ``RWF_DSYNC`` (its
        ``fdatasync`` in the same system call), direct where the file system allows it. The
        first sync of a file written directly also goes this way (a segment's first commit on
        a ``.partial`` prepared ahead, its header synced at creation), then publishes the file.
        Anything else (a frame to split, zeros to add) takes the general path.
        """
        size = len(data)
        length = FRAME_HEAD + size + self._sealer.tag_size  # uncompressed
        short = self._ready or (not self._published and self._direct is not None and self._fast())
        if not short or size > self._frame_size or self._size + length > self._allocated:
            self.append(offset, data)
            self.sync()
            return
        direct = self._direct
        try:
            if direct is not None:  # it checks its own write
                self._sealer.seal_into(direct.space(self._size, length), self._index, offset, data)
                direct.append(length)
            else:
                parts = self._sealer.seal(self._index, 0, offset, size, data)
                if _pwritev_dsync(self._fd, parts, self._size) != length:
                    raise OSError(errno.EIO, "short write")
            self._index += 1
            self._size += length
            if not self._published:
                self._publish()
        except OSError as exc:
            self._fail()  # after a failed write or fsync the file's state is unknown
            raise self._os_error(exc) from exc

    def sync_tail(self) -> SyncTail | None:
        """What a native `append_sync` needs, when its short path applies (else None)."""
        direct = self._direct
        if not self._ready or direct is None:
            return None
        sealer = self._sealer
        return SyncTail(
            self, direct, sealer.key, sealer.prefix, sealer.digest, self._size, self._allocated,
            self._index, self._frame_size,
        )  # fmt: skip

    def synced_natively(self, index: int, size: int) -> None:
        """Native code appended frames up to ``index`` (exclusive), the file now ``size`` long."""
        self._index, self._size = index, size

    def failed_natively(self, exc: OSError) -> Exception:
        """Native code's append failed: refuse further use; return the error to raise."""
        self._fail()
        return self._os_error(exc)

    def sync(self) -> None:
        """Make everything appended so far durable (the first call also publishes the file)."""
        self._check()
        try:
            if self._allocated:
                os.fdatasync(self._fd)  # the size and extents were made durable with the zeros
            else:
                os.fsync(self._fd)
            if not self._published:
                self._publish()
        except OSError as exc:
            self._fail()  # after a failed fsync the page cache state is unknown
            raise self._os_error(exc) from exc

    def _fast(self) -> bool:
        """Whether `append_sync`'s short path suits this file: raw frames, sound."""
        return self._codec.name == "none" and not (self._failed or self._closed)

    def _publish(self) -> None:
        self._tmp.replace(self.path)
        self._published = True
        fsio.fsync_dir(self.path.parent)
        self._ready = self._fast()

    def _reserve(self) -> None:
        """Zero-fill the ``preallocate`` bytes after the header (and fsync both)."""
        if self._ahead and not self._allocated:
            try:
                self._zero_fill(self._size + self._ahead)
            except OSError as exc:
                self._fail()
                raise self._os_error(exc) from exc

    def abandon(self) -> None:
        """Close without publishing: a writer never synced leaves no file behind."""
        if not self._closed:
            self._discard()

    def close(self) -> None:
        """Sync, then close the file."""
        if self._closed:
            return
        try:
            if not self._failed:
                self.sync()
        finally:
            self._discard()

    def _fail(self) -> None:
        self._failed = True
        self._ready = False

    def _discard(self) -> None:
        self._closed, self._ready = True, False
        if self._direct is not None:
            self._direct.close()
        os.close(self._fd)
        if not self._published:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> PartialWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._discard()

    def _check(self) -> None:
        if self._closed or self._failed:
            state = "closed" if self._closed else "failed earlier"
            raise KlioError(f"partial writer for {self.path} is {state}; create a new one")

    def _write(self, parts: list[bytes | memoryview]) -> None:
        view = memoryview(b"".join(parts))
        if self._direct is not None:
            self._direct.invalidate()  # its copy of the last block is out of date
        try:
            if self._ahead and self._size + len(view) > self._allocated:
                self._zero_fill(self._size + len(view) + self._ahead)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], self._size + done)
        except OSError as exc:
            self._fail()
            with suppress(OSError):
                os.ftruncate(self._fd, self._size)  # leave no torn frame behind
            raise self._os_error(exc) from exc
        self._size += len(view)

    def _zero_fill(self, end: int) -> None:
        """Write zeros from the end of what is allocated to ``end``, and make them durable."""
        start = max(self._allocated, self._size)
        zeros = bytes(min(end - start, 1 << 20))
        pos = start
        while pos < end:
            pos += os.pwrite(self._fd, memoryview(zeros)[: end - pos], pos)
        os.fsync(self._fd)  # the new size and extents, once, not at every frame's sync
        self._allocated = end
        if self._want_direct:
            self._want_direct = False
            probe = -(-start // BLOCK) * BLOCK  # a block of the zeros just made durable
            if probe + BLOCK <= end:
                path = self.path if self._published else self._tmp
                capacity = FRAME_HEAD + self._frame_size + self._sealer.tag_size
                self._direct = DirectTail.open(path, capacity, probe)
        if self._direct is not None:
            # The zeros are durable and only direct writes follow: out of the page cache now,
            # or every direct write would have to invalidate the cached pages it covers.
            os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def _os_error(self, exc: OSError) -> Exception:
        return fsio.space_error(self.path, exc) or exc
