"""A restore's bulk read may skip the plaintext SHA-256 only for sealed frames."""

from __future__ import annotations

import os

import pytest
import zstandard

from klio_common import compression
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject
from klio_common.objects import decode_object, encode_object

DATA = os.urandom(50_000) + bytes(200_000)
WRONG_SHA = "0" * 64  # a header whose SHA-256 does not match: only a SHA check notices


def _keyring() -> KeyRing:
    return KeyRing("k1", {"k1": bytes(range(32))})


class _OldZstd:
    """zstd frames as written before 2026-11-25: no content checksum."""

    name = "zstd"

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        out: bytes = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(data)
        return out

    def decompress(self, data: bytes | bytearray | memoryview, max_size: int) -> bytes:
        return compression.get("zstd", 1).decompress(data, max_size)

    def checks_content(self, data: bytes | bytearray | memoryview) -> bool:
        return compression.get("zstd", 1).checks_content(data)


def _object(codec: compression.Codec, keyring: KeyRing, frame_size: int = 1 << 20) -> bytes:
    return encode_object(
        DATA,
        kind="chunk",
        name="c",
        codec=codec,
        keyring=keyring,
        frame_size=frame_size,
        plaintext_sha256=WRONG_SHA,
    )


@pytest.mark.parametrize("frame_size", [1 << 20, 64 * 1024])
def test_encrypted_zstd_frames_are_sealed(frame_size: int) -> None:
    blob = _object(compression.get("zstd", 1), _keyring(), frame_size)
    header, data = decode_object(blob, _keyring(), source="t", sealed_is_enough=True)
    assert data == DATA and header.plaintext_sha256 == WRONG_SHA
    with pytest.raises(CorruptObject, match="SHA-256 of the content does not match"):
        decode_object(blob, _keyring(), source="t")  # everyone else checks it


@pytest.mark.parametrize(
    ("codec", "keyring"),
    [
        (compression.get("zstd", 1), KeyRing.none()),  # not authenticated
        (compression.get("none", 1), _keyring()),  # no content checksum
        (_OldZstd(), _keyring()),  # frames from before the checksum
    ],
    ids=["unencrypted", "uncompressed", "old-zstd"],
)
def test_anything_else_is_checked_by_sha256(codec: compression.Codec, keyring: KeyRing) -> None:
    blob = _object(codec, keyring)
    with pytest.raises(CorruptObject, match="SHA-256 of the content does not match"):
        decode_object(blob, keyring, source="t", sealed_is_enough=True)


def test_zstd_frames_carry_a_checked_content_checksum() -> None:
    codec = compression.get("zstd", 1)
    frame = bytearray(codec.compress(DATA))
    assert codec.checks_content(frame)
    assert not codec.checks_content(_OldZstd().compress(DATA))
    assert not compression.get("none", 1).checks_content(frame)
    frame[-1] ^= 1  # the checksum is the frame's last 4 bytes
    with pytest.raises(CorruptObject, match="checksum"):
        codec.decompress(frame, len(DATA))
