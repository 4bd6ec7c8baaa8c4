"""The object format's parts: the header and the frames, shared by whole and open objects.

`klio_common.objects` builds and checks complete objects from these parts, `klio_common.partial`
open ones (a ``.partial`` appended frame by frame). Here: the layout constants, `ObjectHeader`
and its encoding (`new_header`, `parse_header`, `read_header`), `Sealer` (a piece of plaintext,
compressed, into an authenticated frame), `Opener` (the frames of one object read back and
checked, `BadFrame` at the first that fails), and the small worker pool both directions share.
The format itself is described in docs/internals.md.
"""

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

from klio_common import compression, crypto
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
FRAME_HEAD = _FRAME.size + _U32.size  # ... then crc32 (see _frame_crc)
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
class Frame:
    """A checked frame, as `Opener.frames` yields it."""

    index: int
    flags: int
    offset: int
    plain: bytes  # empty when the opener only authenticates
    end: int  # file position after the frame
    size: int  # plaintext bytes the frame holds
    sealed: bool = False  # authenticated (AEAD) and its codec checked the plaintext


class BadFrame(Exception):
    """A frame failed a check; ``pos``/``end`` say where it starts and claims to end."""

    def __init__(self, index: int, reason: str, pos: int, end: int) -> None:
        super().__init__(reason)
        self.index, self.reason, self.pos, self.end = index, reason, pos, end

    def torn(self, data: bytes) -> bool:
        """Tell whether the frame is the file's tail: it reaches EOF or only zeros follow."""
        return self.end >= len(data) or data.count(0, self.pos) == len(data) - self.pos


def corrupt(source: str, what: str) -> CorruptObject:
    """The error for a damaged object: ``<source> is corrupt: <what>``."""
    return CorruptObject(f"{source} is corrupt: {what}", hint=_HINT)


class Sealer:
    """Turns compressed pieces into frames for one object (one data key, one nonce space)."""

    def __init__(self, header: ObjectHeader, data_key: bytes | None) -> None:
        self.head = _encode_header(header)
        self.digest = hashlib.sha256(self.head).digest()[:16]
        self.prefix = header.nonce_prefix
        self.cipher = crypto.data_cipher(data_key) if data_key is not None else None
        self.key = data_key  # for a native sealer of the same frames (the pump's turn)
        self.tag_size = crypto.TAG_SIZE if data_key is not None else 0  # after each payload

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

    def seal_into(self, buf: memoryview, index: int, offset: int, data: memoryview) -> None:
        """`seal` ``data`` uncompressed into ``buf``, which is exactly the frame's size
        (``FRAME_HEAD + len(data) + tag_size``); no flags."""
        size = len(data)
        _FRAME.pack_into(buf, 0, size + self.tag_size, 0, offset, size)
        crc = _frame_crc(buf[: _FRAME.size], data, self.cipher is not None)
        _U32.pack_into(buf, _FRAME.size, crc)
        if self.cipher is None:
            buf[FRAME_HEAD:] = data
            return
        nonce = self.prefix + _NONCE_INDEX.pack(index)
        aad = _AAD.pack(self.digest, index, 0, offset, size)
        self.cipher.encrypt_into(nonce, data, aad, buf[FRAME_HEAD:])


def _frame_crc(fields: bytes | memoryview, payload: bytes | memoryview, sealed: bool) -> int:
    """CRC-32 of a frame: of its fields only when encrypted (the AEAD tag already covers the
    payload and, through the AAD, the fields), of fields and payload otherwise."""
    crc = zlib.crc32(fields)
    return crc if sealed else zlib.crc32(payload, crc)


def parallel_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> Iterator[_R]:
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


def new_header(
    *,
    kind: str,
    name: str,
    codec: Codec,
    keyring: KeyRing,
    size: int | None,
    sha: str | None,
    extra: dict[str, str] | None,
) -> tuple[ObjectHeader, bytes | None]:
    """A header for a new object, and its fresh data key (None without an active key)."""
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


def parse_header(view: memoryview, source: str) -> tuple[ObjectHeader, bytes, int]:
    """Return the header, its encoded bytes (for the AAD digest) and where frames start."""
    if len(view) < _PREAMBLE.size:
        raise corrupt(source, f"too short for an object ({len(view)} bytes)")
    magic, length = _PREAMBLE.unpack_from(view)
    if magic != MAGIC:
        raise corrupt(source, "not a klio object (bad magic)")
    end = _PREAMBLE.size + length + _U32.size
    if length > MAX_HEADER_SIZE or end > len(view):
        raise corrupt(source, "header is truncated")
    body = view[_PREAMBLE.size : end - _U32.size]
    if zlib.crc32(body) != _U32.unpack_from(view, end - _U32.size)[0]:
        raise corrupt(source, "header checksum mismatch")
    try:
        header = msgspec.json.decode(body, type=ObjectHeader)
    except msgspec.DecodeError as exc:
        raise corrupt(source, f"invalid header: {exc}") from None
    if header.format != FORMAT:
        raise CorruptObject(
            f"{source} has object format {header.format}, this klio reads format {FORMAT}",
            hint="upgrade klio to read objects written by a newer version",
        )
    if header.codec not in compression.NAMES:
        raise corrupt(source, f"unknown codec '{header.codec}'")
    if header.key_id is not None and (header.wrapped_key is None or len(header.nonce_prefix) != 4):
        raise corrupt(source, "encrypted header lacks its wrapped key or nonce prefix")
    if header.plaintext_size is not None and header.plaintext_size < 0:
        raise corrupt(source, "negative plaintext size")
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
    return parse_header(memoryview(data).cast("B"), source)[0]


def opener(header: ObjectHeader, head: bytes, keyring: KeyRing, source: str) -> Opener:
    """The `Opener` of an object whose header ``parse_header`` returned (unwraps its key)."""
    cipher = None
    if header.key_id is not None:
        assert header.wrapped_key is not None  # checked by parse_header
        data_key = keyring.unwrap(header.key_id, header.wrapped_key, what=source)
        cipher = crypto.data_cipher(data_key)
    return Opener(header, compression.get(header.codec), cipher, head)


class Opener:
    """Reads and checks the frames of one object."""

    def __init__(
        self, header: ObjectHeader, codec: Codec, cipher: crypto.AESGCM | None, head: bytes
    ) -> None:
        self.codec, self.cipher, self.prefix = codec, cipher, header.nonce_prefix
        self.digest = hashlib.sha256(head).digest()[:16]
        self.authenticate_only = False  # check CRC and tag, do not decompress

    def frames(self, view: memoryview, pos: int, limit: int, budget: int) -> Iterator[Frame]:
        """Yield checked frames in order; raise ``BadFrame`` at the first bad one.

        Frames must end by ``limit``, and ``budget`` bounds the sum of their
        plaintext lengths (decompression bombs).
        """
        specs: list[_Spec] = []
        error: BadFrame | None = None
        while pos < len(view):
            index = len(specs)
            if len(view) - pos < FRAME_HEAD:
                error = BadFrame(index, "is truncated", pos, len(view))
                break
            length, flags, offset, size = _FRAME.unpack_from(view, pos)
            end = pos + FRAME_HEAD + length
            if not length and not flags:  # only an empty object's (last) frame is empty:
                error = BadFrame(index, "is empty", pos, end)  # these are a partial's zeros
                break
            if end > len(view):
                error = BadFrame(index, "is truncated", pos, end)
                break
            budget -= size
            if flags & ~FLAG_LAST:
                error = BadFrame(index, f"has unknown flags {flags:#x}", pos, end)
                break
            if budget < 0 or offset + size > limit:
                error = BadFrame(index, "claims more data than the object may hold", pos, end)
                break
            specs.append(_Spec(view, index, pos, end, flags, offset, size))
            pos = end
        for spec, (plain, sealed) in zip(specs, parallel_map(self._open, specs), strict=True):
            yield Frame(spec.index, spec.flags, spec.offset, plain, spec.end, spec.size, sealed)
        if error is not None:
            raise error

    def _open(self, s: _Spec) -> tuple[bytes, bool]:
        view = s.view
        payload = view[s.pos + FRAME_HEAD : s.end]
        crc = _frame_crc(view[s.pos : s.pos + _FRAME.size], payload, self.cipher is not None)
        if crc != _U32.unpack_from(view, s.pos + _FRAME.size)[0]:
            raise BadFrame(s.index, "failed its checksum", s.pos, s.end)
        data: bytes | memoryview = payload
        if self.cipher is not None:
            nonce = self.prefix + _NONCE_INDEX.pack(s.index)
            aad = _AAD.pack(self.digest, s.index, s.flags, s.offset, s.size)
            try:
                data = self.cipher.decrypt(nonce, payload, aad)
            except crypto.InvalidTag:
                raise BadFrame(s.index, "failed authentication", s.pos, s.end) from None
        if self.authenticate_only:
            return b"", False
        try:
            plain = self.codec.decompress(data, s.size)
        except CorruptObject as exc:
            raise BadFrame(
                s.index, f"cannot be decompressed: {exc.message}", s.pos, s.end
            ) from None
        if len(plain) != s.size:
            raise BadFrame(s.index, f"holds {len(plain)} bytes, expected {s.size}", s.pos, s.end)
        return plain, self.cipher is not None and self.codec.checks_content(data)
