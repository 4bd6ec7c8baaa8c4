"""Compression codecs for stored objects: ``get(name, level)`` is the only entry point."""

from __future__ import annotations

import threading
from typing import Final, Protocol

import zstandard

from klio_common.errors import ConfigError, CorruptObject

NAMES: Final = ("none", "zstd")
"""Every codec name an object header may carry."""

ZSTD_LEVELS: Final = range(1, zstandard.MAX_COMPRESSION_LEVEL + 1)


class Codec(Protocol):
    """A compression codec; implementations are safe to share between threads."""

    @property
    def name(self) -> str:
        """The name recorded in object headers (``"zstd"``, ``"none"``)."""
        ...

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        """Return ``data`` compressed."""
        ...

    def decompress(self, data: bytes | bytearray | memoryview, max_size: int) -> bytes:
        """Return ``data`` decompressed.

        Raises:
            CorruptObject: the data is not valid for this codec or would
                decompress to more than ``max_size`` bytes.
        """
        ...

    def checks_content(self, data: bytes | bytearray | memoryview) -> bool:
        """Whether decompressing ``data`` (a compressed frame) verifies a checksum of the result."""
        ...


class _NoneCodec:
    """Stores data as is."""

    name = "none"

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return bytes(data)

    def decompress(self, data: bytes | bytearray | memoryview, max_size: int) -> bytes:
        if len(data) > max_size:
            raise CorruptObject(f"uncompressed data has {len(data)} bytes, more than {max_size}")
        return bytes(data)

    def checks_content(self, data: bytes | bytearray | memoryview) -> bool:
        return False


_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


class _ZstdCodec:
    """Zstandard, one frame per call, with the content size and an XXH64 checksum of the content
    in the frame (checked by every decompression: a cheap end-to-end check of the codec)."""

    name = "zstd"

    def __init__(self, level: int) -> None:
        self.level = level
        # ZstdCompressor/ZstdDecompressor objects are not thread-safe; creating
        # one per call would cost more than compressing a small frame.
        self._local = threading.local()

    def _cctx(self) -> zstandard.ZstdCompressor:
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True, write_checksum=True
            )
            self._local.cctx = cctx
        return cctx

    def _dctx(self) -> zstandard.ZstdDecompressor:
        dctx: zstandard.ZstdDecompressor | None = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = zstandard.ZstdDecompressor()
            self._local.dctx = dctx
        return dctx

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        result: bytes = self._cctx().compress(data)
        return result

    def checks_content(self, data: bytes | bytearray | memoryview) -> bool:
        # The frame header's descriptor byte follows the 4-byte magic; bit 2 is the
        # Content_Checksum_flag (RFC 8878, 3.1.1.1.1). Frames written before 2026-11-25 lack it.
        return len(data) > 4 and bytes(data[:4]) == _ZSTD_MAGIC and bool(data[4] & 0x04)

    def decompress(self, data: bytes | bytearray | memoryview, max_size: int) -> bytes:
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise CorruptObject(f"invalid zstd frame header: {exc}") from None
        if declared > max_size:
            # The library trusts the declared size and would allocate it whatever
            # max_output_size says: refuse before decompressing (bomb guard).
            raise CorruptObject(f"zstd frame declares {declared} bytes, more than {max_size}")
        try:
            if declared >= 0:
                result: bytes = self._dctx().decompress(data, allow_extra_data=False)
            else:
                result = self._stream(data, max_size)
        except zstandard.ZstdError as exc:
            raise CorruptObject(f"invalid zstd data: {exc}") from None
        if len(result) > max_size:
            raise CorruptObject(f"zstd data decompresses to more than {max_size} bytes")
        return result

    def _stream(self, data: bytes | bytearray | memoryview, max_size: int) -> bytes:
        """Decompress a frame without a declared size, stopping past ``max_size``."""
        dobj = self._dctx().decompressobj()
        out = bytearray()
        view = memoryview(data)
        step = 1 << 16
        for start in range(0, len(view), step):
            out += dobj.decompress(view[start : start + step])
            if len(out) > max_size:
                raise CorruptObject(f"zstd data decompresses to more than {max_size} bytes")
        if not dobj.eof:
            raise CorruptObject("invalid zstd data: truncated frame")
        if dobj.unused_data:
            raise CorruptObject("invalid zstd data: extra bytes after the frame")
        return bytes(out)


_NONE: Final = _NoneCodec()
_zstd_codecs: dict[int, _ZstdCodec] = {}
_zstd_lock = threading.Lock()


FAST_LEVEL: Final = -1
"""zstd's fastest useful level, for data rewritten soon anyway (an open segment's frames)."""


def fast(codec: Codec) -> Codec:
    """The same algorithm at its fastest level: zstd at `FAST_LEVEL`, ``none`` as it is.

    A ``.partial`` is appended a few KiB at a time (a frame per commit for a synchronous
    standby) and rewritten into the segment's object at the configured level when the segment
    closes: what its frames cost in CPU is commit latency, what they save in space is gone an
    hour later. zstd -1 costs a third of level 1 on such frames.
    """
    if codec.name != "zstd":
        return codec
    with _zstd_lock:
        fast_codec = _zstd_codecs.get(FAST_LEVEL)
        if fast_codec is None:
            fast_codec = _zstd_codecs[FAST_LEVEL] = _ZstdCodec(FAST_LEVEL)
    return fast_codec


def get(name: str, level: int = 3) -> Codec:
    """Return the codec called ``name``.

    Args:
        name: ``"zstd"`` or ``"none"`` (as in ``compression.algorithm`` and object headers).
        level: the zstd compression level, 1 to 22; ignored by ``none`` and
            irrelevant for decompression.

    Raises:
        ConfigError: unknown name or level out of range.
    """
    if name == "none":
        return _NONE
    if name == "zstd":
        if level not in ZSTD_LEVELS:
            raise ConfigError(
                [f"compression.level: {level} is out of range for zstd"],
                hint=f"use a level from {ZSTD_LEVELS.start} to {ZSTD_LEVELS.stop - 1} (default 3)",
            )
        with _zstd_lock:
            codec = _zstd_codecs.get(level)
            if codec is None:
                codec = _zstd_codecs[level] = _ZstdCodec(level)
        return codec
    raise ConfigError(
        [f"compression.algorithm: unknown codec '{name}'"],
        hint=f"valid names are: {', '.join(NAMES)}",
    )
