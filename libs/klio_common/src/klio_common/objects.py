"""Whole objects: encode, check and decode a complete object of the self-describing format.

An object is a header, then compressed and optionally encrypted frames (the parts, shared with
the open objects of `klio_common.partial`, are in `klio_common.frames`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from klio_common import fsio
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.frames import (
    FLAG_LAST,
    FORMAT,
    MAGIC,
    MAX_HEADER_SIZE,
    MAX_PLAINTEXT_SIZE,
    BadFrame,
    ObjectHeader,
    Sealer,
    corrupt,
    new_header,
    opener,
    parallel_map,
    parse_header,
    read_header,
)

__all__ = [
    "FLAG_LAST",
    "FORMAT",
    "MAGIC",
    "MAX_HEADER_SIZE",
    "MAX_PLAINTEXT_SIZE",
    "ObjectHeader",
    "check_object",
    "decode_object",
    "encode_object",
    "read_header",
    "write_object",
]


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
    compressed = parallel_map(
        lambda start: codec.compress(view[start : start + frame_size]), starts
    )
    header, data_key = new_header(
        kind=kind,
        name=name,
        codec=codec,
        keyring=keyring,
        size=len(view),
        sha=plaintext_sha256 or hashlib.sha256(view).hexdigest(),
        extra=extra,
    )
    sealer = Sealer(header, data_key)
    parts: list[bytes | memoryview] = [sealer.head]
    for index, (start, payload) in enumerate(zip(starts, compressed, strict=True)):
        flags = FLAG_LAST if start + frame_size >= len(view) else 0
        size = min(frame_size, len(view) - start)
        parts += sealer.seal(index, flags, start, size, payload)
    return b"".join(parts)


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
    header, head, pos = parse_header(view, source)
    size = header.plaintext_size
    if size is None:
        raise corrupt(source, "header has no plaintext size (an open partial: use read_partial)")
    if size > max_size:
        raise corrupt(source, f"declares {size} bytes, more than the maximum {max_size}")
    reader = opener(header, head, keyring, source)
    reader.authenticate_only = not decode
    pieces: list[bytes] = []
    done, last, sealed = 0, False, sealed_is_enough
    try:
        for frame in reader.frames(view, pos, size, size):
            if last:
                raise corrupt(source, f"frame {frame.index} follows the last frame")
            if frame.offset != done:
                raise corrupt(
                    source, f"frame {frame.index} is at offset {frame.offset}, expected {done}"
                )
            if decode:
                pieces.append(frame.plain)
                sealed = sealed and frame.sealed
            done += frame.size
            last = bool(frame.flags & FLAG_LAST)
    except BadFrame as bad:
        raise corrupt(source, f"frame {bad.index} {bad.reason}") from None
    if not last:
        raise corrupt(source, "truncated (no last frame)")
    if done != size:
        raise corrupt(source, f"holds {done} bytes, the header says {size}")
    if not decode:
        return header, b""
    if not sealed:
        sha = hashlib.sha256()
        for piece in pieces:
            sha.update(piece)
        if sha.hexdigest() != header.plaintext_sha256:
            raise corrupt(source, "SHA-256 of the content does not match the header")
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
