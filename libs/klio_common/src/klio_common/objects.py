"""The self-describing object format: header, then compressed and optionally encrypted frames."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import msgspec

from klio_common import compression, crypto, fsio
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject

MAGIC: Final = b"KLIOOBJ1"
FORMAT: Final = 1
MAX_HEADER_SIZE: Final = 1 << 20
MAX_PLAINTEXT_SIZE: Final = 1 << 30
"""Default bound on what one object may decode to (a WAL segment is at most 1 GiB)."""

FLAG_LAST: Final = 0x01
_PREAMBLE = struct.Struct(">8sI")  # magic, header length
_U32 = struct.Struct(">I")
_FRAME = struct.Struct(">IBQI")  # payload length, flags, plaintext offset, plaintext length
_FRAME_HEAD = _FRAME.size + _U32.size  # ... then crc32 (see _frame_crc)
_AAD = struct.Struct(">16sQBQI")  # header digest, frame index, flags, offset, plaintext length
_NONCE_INDEX = struct.Struct(">Q")
_PARALLEL_MIN = 4  # frames; below this, handing work to threads costs more than it saves
_WORKERS = min(4, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_T = TypeVar("_T")
_R = TypeVar("_R")
_HINT = "restore it from Tier 2 or another copy; do not use this file"


class ObjectHeader(msgspec.Struct, frozen=True, kw_only=True):
    """What every stored object says about itself (JSON after the magic)."""

    format: int = FORMAT
    kind: str
    name: str
    codec: str
    key_id: str | None = None
    wrapped_key: bytes | None = None
    nonce_prefix: bytes = b""
    plaintext_size: int | None = None
    plaintext_sha256: str | None = None
    created_at: int = 0
    extra: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class _Spec:
    """Where a frame lies in the object, and what its fields say."""

    view: memoryview
    index: int
    pos: int
    end: int
    flags: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class _Frame:
    index: int
    flags: int
    offset: int
    plain: bytes  # empty when the opener only authenticates
    end: int  # file position after the frame
    size: int  # plaintext bytes the frame holds
    sealed: bool = False  # authenticated (AEAD) and its codec checked the plaintext


class _BadFrame(Exception):
    """A frame failed a check; ``pos``/``end`` say where it starts and claims to end."""

    def __init__(self, index: int, reason: str, pos: int, end: int) -> None:
        super().__init__(reason)
        self.index, self.reason, self.pos, self.end = index, reason, pos, end

    def torn(self, data: bytes) -> bool:
        """Tell whether the frame is the file's tail: it reaches EOF or only zeros follow."""
        return self.end >= len(data) or data.count(0, self.pos) == len(data) - self.pos


def _corrupt(source: str, what: str) -> CorruptObject:
    return CorruptObject(f"{source} is corrupt: {what}", hint=_HINT)


class _Sealer:
    """Turns compressed pieces into frames for one object (one data key, one nonce space)."""

    def __init__(self, header: ObjectHeader, data_key: bytes | None) -> None:
        self.head = _encode_header(header)
        self.digest = hashlib.sha256(self.head).digest()[:16]
        self.prefix = header.nonce_prefix
        self.cipher = crypto.data_cipher(data_key) if data_key is not None else None

    def seal(
        self, index: int, flags: int, offset: int, size: int, payload: bytes | memoryview
    ) -> list[bytes | memoryview]:
        """Return the parts of frame ``index`` holding ``size`` plaintext bytes at ``offset``."""
        if self.cipher is not None:
            nonce = self.prefix + _NONCE_INDEX.pack(index)
            aad = _AAD.pack(self.digest, index, flags, offset, size)
            payload = self.cipher.encrypt(nonce, payload, aad)
        fields = _FRAME.pack(len(payload), flags, offset, size)
        return [fields, _U32.pack(_frame_crc(fields, payload, self.cipher is not None)), payload]


def _frame_crc(fields: bytes | memoryview, payload: bytes | memoryview, sealed: bool) -> int:
    """CRC-32 of a frame: of its fields only when encrypted (the AEAD tag already covers the
    payload and, through the AAD, the fields), of fields and payload otherwise."""
    crc = zlib.crc32(fields)
    return crc if sealed else zlib.crc32(payload, crc)


def _map(fn: Callable[[_T], _R], items: Sequence[_T]) -> Iterator[_R]:
    """Map ``fn`` in order, on the worker pool when there is enough work to share."""
    global _pool
    if len(items) < _PARALLEL_MIN or _WORKERS < 2:
        return map(fn, items)
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="klio-objects")
    return _pool.map(fn, items)


def _encode_header(header: ObjectHeader) -> bytes:
    body = msgspec.json.encode(header)
    return _PREAMBLE.pack(MAGIC, len(body)) + body + _U32.pack(zlib.crc32(body))


def _new_header(
    *,
    kind: str,
    name: str,
    codec: Codec,
    keyring: KeyRing,
    size: int | None,
    sha: str | None,
    extra: dict[str, str] | None,
) -> tuple[ObjectHeader, bytes | None]:
    data_key = wrapped = None
    nonce_prefix = b""
    if keyring.active is not None:
        data_key = crypto.new_data_key()
        wrapped = keyring.wrap(data_key, keyring.active)
        nonce_prefix = os.urandom(4)
    header = ObjectHeader(
        kind=kind,
        name=name,
        codec=codec.name,
        key_id=keyring.active,
        wrapped_key=wrapped,
        nonce_prefix=nonce_prefix,
        plaintext_size=size,
        plaintext_sha256=sha,
        created_at=int(time.time()),
        extra=dict(extra or {}),
    )
    return header, data_key


def encode_object(
    plaintext: bytes | bytearray | memoryview,
    *,
    kind: str,
    name: str,
    codec: Codec,
    keyring: KeyRing,
    frame_size: int = 1 << 20,
    extra: dict[str, str] | None = None,
    plaintext_sha256: str | None = None,
) -> bytes:
    """Encode a complete object: header, then frames of ``frame_size`` plaintext bytes.

    With ``keyring.active`` set, each object gets a fresh data key wrapped by
    the active master key; otherwise frames are stored unencrypted. ``plaintext_sha256``
    (hex) is the caller's own SHA-256 of ``plaintext``, when it has one: not computed again.
    """
    if not 0 < frame_size < 1 << 32:
        raise ValueError(f"frame_size {frame_size} is out of range")
    view = memoryview(plaintext).cast("B")
    starts = range(0, len(view), frame_size) if view else range(1)
    # Compression runs on the pool while this thread hashes; sealing needs the
    # header (the SHA-256 is in it and its digest is in every frame's AAD).
    compressed = _map(lambda start: codec.compress(view[start : start + frame_size]), starts)
    header, data_key = _new_header(
        kind=kind,
        name=name,
        codec=codec,
        keyring=keyring,
        size=len(view),
        sha=plaintext_sha256 or hashlib.sha256(view).hexdigest(),
        extra=extra,
    )
    sealer = _Sealer(header, data_key)
    parts: list[bytes | memoryview] = [sealer.head]
    for index, (start, payload) in enumerate(zip(starts, compressed, strict=True)):
        flags = FLAG_LAST if start + frame_size >= len(view) else 0
        size = min(frame_size, len(view) - start)
        parts += sealer.seal(index, flags, start, size, payload)
    return b"".join(parts)


def _parse_header(view: memoryview, source: str) -> tuple[ObjectHeader, bytes, int]:
    """Return the header, its encoded bytes (for the AAD digest) and where frames start."""
    if len(view) < _PREAMBLE.size:
        raise _corrupt(source, f"too short for an object ({len(view)} bytes)")
    magic, length = _PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        raise _corrupt(source, "not a klio object (bad magic)")
    end = _PREAMBLE.size + length + _U32.size
    if length > MAX_HEADER_SIZE or end > len(view):
        raise _corrupt(source, "header is truncated")
    body = view[_PREAMBLE.size : end - _U32.size]
    if zlib.crc32(body) != _U32.unpack_from(view, end - _U32.size)[0]:
        raise _corrupt(source, "header checksum mismatch")
    try:
        header = msgspec.json.decode(body, type=ObjectHeader)
    except msgspec.DecodeError as exc:
        raise _corrupt(source, f"invalid header: {exc}") from None
    if header.format != FORMAT:
        raise CorruptObject(
            f"{source} has object format {header.format}, this klio reads format {FORMAT}",
            hint="upgrade klio to read objects written by a newer version",
        )
    if header.codec not in compression.NAMES:
        raise _corrupt(source, f"unknown codec '{header.codec}'")
    if header.key_id is not None and (header.wrapped_key is None or len(header.nonce_prefix) != 4):
        raise _corrupt(source, "encrypted header lacks its wrapped key or nonce prefix")
    if header.plaintext_size is not None and header.plaintext_size < 0:
        raise _corrupt(source, "negative plaintext size")
    return header, bytes(view[:end]), end


def read_header(
    data: bytes | bytearray | memoryview | Path, *, source: str = "object"
) -> ObjectHeader:
    """Return the header of an object held in memory or in a file (reads only the header).

    Raises:
        CorruptObject: not an object, or a damaged header.
    """
    if isinstance(data, Path):
        with data.open("rb") as f:
            head = f.read(_PREAMBLE.size)
            if len(head) == _PREAMBLE.size:
                length = _PREAMBLE.unpack(head)[1]
                head += f.read(min(length, MAX_HEADER_SIZE + 1) + _U32.size)
        data = head
    return _parse_header(memoryview(data).cast("B"), source)[0]


def _opener(header: ObjectHeader, head: bytes, keyring: KeyRing, source: str) -> _Opener:
    cipher = None
    if header.key_id is not None:
        assert header.wrapped_key is not None  # checked by _parse_header
        data_key = keyring.unwrap(header.key_id, header.wrapped_key, what=source)
        cipher = crypto.data_cipher(data_key)
    return _Opener(header, compression.get(header.codec), cipher, head)


class _Opener:
    """Reads and checks the frames of one object."""

    def __init__(
        self, header: ObjectHeader, codec: Codec, cipher: crypto.AESGCM | None, head: bytes
    ) -> None:
        self.codec, self.cipher, self.prefix = codec, cipher, header.nonce_prefix
        self.digest = hashlib.sha256(head).digest()[:16]
        self.authenticate_only = False  # check CRC and tag, do not decompress

    def frames(self, view: memoryview, pos: int, limit: int, budget: int) -> Iterator[_Frame]:
        """Yield checked frames in order; raise ``_BadFrame`` at the first bad one.

        Frames must end by ``limit``, and ``budget`` bounds the sum of their
        plaintext lengths (decompression bombs).
        """
        specs: list[_Spec] = []
        error: _BadFrame | None = None
        while pos < len(view):
            index = len(specs)
            if len(view) - pos < _FRAME_HEAD:
                error = _BadFrame(index, "is truncated", pos, len(view))
                break
            length, flags, offset, size = _FRAME.unpack_from(view, pos)
            end = pos + _FRAME_HEAD + length
            if not length and not flags:  # only an empty object's (last) frame is empty:
                error = _BadFrame(index, "is empty", pos, end)  # these are a partial's zeros
                break
            if end > len(view):
                error = _BadFrame(index, "is truncated", pos, end)
                break
            budget -= size
            if flags & ~FLAG_LAST:
                error = _BadFrame(index, f"has unknown flags {flags:#x}", pos, end)
                break
            if budget < 0 or offset + size > limit:
                error = _BadFrame(index, "claims more data than the object may hold", pos, end)
                break
            specs.append(_Spec(view, index, pos, end, flags, offset, size))
            pos = end
        for spec, (plain, sealed) in zip(specs, _map(self._open, specs), strict=True):
            yield _Frame(spec.index, spec.flags, spec.offset, plain, spec.end, spec.size, sealed)
        if error is not None:
            raise error

    def _open(self, s: _Spec) -> tuple[bytes, bool]:
        view = s.view
        payload = view[s.pos + _FRAME_HEAD : s.end]
        crc = _frame_crc(view[s.pos : s.pos + _FRAME.size], payload, self.cipher is not None)
        if crc != _U32.unpack_from(view, s.pos + _FRAME.size)[0]:
            raise _BadFrame(s.index, "failed its checksum", s.pos, s.end)
        data: bytes | memoryview = payload
        if self.cipher is not None:
            nonce = self.prefix + _NONCE_INDEX.pack(s.index)
            aad = _AAD.pack(self.digest, s.index, s.flags, s.offset, s.size)
            try:
                data = self.cipher.decrypt(nonce, payload, aad)
            except crypto.InvalidTag:
                raise _BadFrame(s.index, "failed authentication", s.pos, s.end) from None
        if self.authenticate_only:
            return b"", False
        try:
            plain = self.codec.decompress(data, s.size)
        except CorruptObject as exc:
            raise _BadFrame(
                s.index, f"cannot be decompressed: {exc.message}", s.pos, s.end
            ) from None
        if len(plain) != s.size:
            raise _BadFrame(s.index, f"holds {len(plain)} bytes, expected {s.size}", s.pos, s.end)
        return plain, self.cipher is not None and self.codec.checks_content(data)


def decode_object(
    data: bytes | bytearray | memoryview,
    keyring: KeyRing,
    *,
    source: str,
    max_size: int = MAX_PLAINTEXT_SIZE,
    sealed_is_enough: bool = False,
) -> tuple[ObjectHeader, bytes]:
    """Check and decode a complete object.

    Args:
        data: the whole object.
        keyring: keys to decrypt with (the header names the key).
        source: names the object in errors, e.g. ``"segment 000000010000000000000003"``.
        max_size: refuse objects that would decode to more (decompression bombs).
        sealed_is_enough: skip the plaintext SHA-256 when every frame is sealed: encrypted
            (its AEAD tag proves the header, plaintext SHA-256 included, and the compressed
            bytes are what the key's holder wrote) and compressed with a content checksum
            (zstd's XXH64, checked as it decompresses: the codec gave back what went in).
            For the bulk read of a restore; `klio verify` and everything else leave it off.

    Raises:
        CorruptObject: any check failed (header, CRC, tag, offsets, last frame, size, SHA-256).
        EncryptionKeyError: the object's key is not configured or is the wrong key.
    """
    return _walk(data, keyring, source, max_size, decode=True, sealed_is_enough=sealed_is_enough)


def check_object(
    data: bytes | bytearray | memoryview,
    keyring: KeyRing,
    *,
    source: str,
    max_size: int = MAX_PLAINTEXT_SIZE,
) -> ObjectHeader:
    """Check that a complete object is intact as stored, without decompressing it.

    Checks the header, then every frame: its CRC-32 and, when encrypted, its AEAD tag (which
    binds the header), the offsets, sizes and the last frame. Any byte changed at rest fails
    here. It does not recompute the plaintext SHA-256 (`decode_object` does): this is the
    check for copying an object elsewhere, where the bytes matter, not the content.

    Raises:
        CorruptObject: a check failed. EncryptionKeyError: the object's key is unusable.
    """
    return _walk(data, keyring, source, max_size, decode=False)[0]


def _walk(
    data: bytes | bytearray | memoryview,
    keyring: KeyRing,
    source: str,
    max_size: int,
    decode: bool,
    sealed_is_enough: bool = False,
) -> tuple[ObjectHeader, bytes]:
    view = memoryview(data).cast("B")
    header, head, pos = _parse_header(view, source)
    size = header.plaintext_size
    if size is None:
        raise _corrupt(source, "header has no plaintext size (an open partial: use read_partial)")
    if size > max_size:
        raise _corrupt(source, f"declares {size} bytes, more than the maximum {max_size}")
    opener = _opener(header, head, keyring, source)
    opener.authenticate_only = not decode
    pieces: list[bytes] = []
    done, last, sealed = 0, False, sealed_is_enough
    try:
        for frame in opener.frames(view, pos, size, size):
            if last:
                raise _corrupt(source, f"frame {frame.index} follows the last frame")
            if frame.offset != done:
                raise _corrupt(
                    source, f"frame {frame.index} is at offset {frame.offset}, expected {done}"
                )
            if decode:
                pieces.append(frame.plain)
                sealed = sealed and frame.sealed
            done += frame.size
            last = bool(frame.flags & FLAG_LAST)
    except _BadFrame as bad:
        raise _corrupt(source, f"frame {bad.index} {bad.reason}") from None
    if not last:
        raise _corrupt(source, "truncated (no last frame)")
    if done != size:
        raise _corrupt(source, f"holds {done} bytes, the header says {size}")
    if not decode:
        return header, b""
    if not sealed:
        sha = hashlib.sha256()
        for piece in pieces:
            sha.update(piece)
        if sha.hexdigest() != header.plaintext_sha256:
            raise _corrupt(source, "SHA-256 of the content does not match the header")
    return header, pieces[0] if len(pieces) == 1 else b"".join(pieces)


def write_object(
    path: Path,
    data: bytes | bytearray | memoryview,
    *,
    file_mode: int = 0o640,
    dir_mode: int = 0o750,
) -> None:
    """Store an encoded object crash-safely (see :func:`klio_common.fsio.atomic_write`)."""
    fsio.atomic_write(path, data, file_mode=file_mode, dir_mode=dir_mode)
