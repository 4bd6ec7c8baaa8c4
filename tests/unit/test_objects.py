"""Tests for klio_common.objects: the object format and its checks (partials: test_partial.py)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from klio_common import compression
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject, EncryptionKeyError
from klio_common.objects import (
    MAGIC,
    ObjectHeader,
    decode_object,
    encode_object,
    read_header,
    write_object,
)

SEG = "segment 000000010000000000000003"
HINT = "restore it from Tier 2 or another copy; do not use this file"
ZSTD, NONE = compression.get("zstd"), compression.get("none")
FRAME = 4096
DATA = (b"pg wal record " * 1000 + os.urandom(5000)) * 3  # 57000 bytes: 14 frames


def ring(tmp: Path, key_id: str = "k1", secret: bytes | None = None) -> KeyRing:
    path = tmp / f"key-{key_id}-{os.urandom(4).hex()}"
    path.write_bytes(secret or os.urandom(32))
    return KeyRing.load(key_id, {key_id: path})


def encode(
    data: bytes,
    keyring: KeyRing,
    codec: compression.Codec = ZSTD,
    extra: dict[str, str] | None = None,
) -> bytes:
    return encode_object(
        data,
        kind="wal",
        name="000000010000000000000003",
        codec=codec,
        keyring=keyring,
        frame_size=FRAME,
        extra=extra,
    )


def frames(obj: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Return where the header ends and each frame's (start, end)."""
    (length,) = struct.unpack_from(">I", obj, 8)
    pos = head_end = 12 + length + 4
    spans = []
    while pos < len(obj):
        (size,) = struct.unpack_from(">I", obj, pos)
        spans.append((pos, pos + 21 + size))
        pos += 21 + size
    return head_end, spans


def fix_crc(obj: bytearray, start: int, end: int) -> None:
    """Recompute an unencrypted frame's CRC (an encrypted frame's covers only its fields)."""
    crc = zlib.crc32(obj[start + 21 : end], zlib.crc32(obj[start : start + 17]))
    obj[start + 17 : start + 21] = struct.pack(">I", crc)


def with_header(obj: bytes, **changes: object) -> bytes:
    """Rewrite the header JSON (with a valid header CRC), keeping the frames."""
    head_end, _ = frames(obj)
    fields = json.loads(obj[12 : head_end - 4])
    fields.update(changes)
    body = json.dumps(fields).encode()
    return (
        MAGIC
        + struct.pack(">I", len(body))
        + body
        + struct.pack(">I", zlib.crc32(body))
        + obj[head_end:]
    )


def corrupt_message(excinfo: pytest.ExceptionInfo[CorruptObject]) -> str:
    assert excinfo.value.hint == HINT
    return excinfo.value.message


@pytest.mark.parametrize("codec", [ZSTD, NONE], ids=["zstd", "none"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
@pytest.mark.parametrize("size", [0, 1, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME + 7, len(DATA)])
def test_round_trip(tmp_path: Path, codec: compression.Codec, encrypted: bool, size: int) -> None:
    keyring = ring(tmp_path) if encrypted else KeyRing.none()
    data = DATA[:size]
    before = int(time.time())
    obj = encode(data, keyring, codec, extra={"timeline": "1"})
    header, out = decode_object(obj, keyring, source=SEG)
    assert out == data
    assert header == read_header(obj)
    assert (header.format, header.kind, header.name, header.codec) == (
        1,
        "wal",
        "000000010000000000000003",
        codec.name,
    )
    assert header.key_id == ("k1" if encrypted else None)
    assert (header.wrapped_key is not None) is encrypted
    assert header.plaintext_size == size
    assert header.plaintext_sha256 == hashlib.sha256(data).hexdigest()
    assert before <= header.created_at <= int(time.time())
    assert header.extra == {"timeline": "1"}
    assert len(frames(obj)[1]) == max(1, -(-size // FRAME))


def test_encrypted_objects_hide_the_plaintext(k1: KeyRing) -> None:
    marker = b"CONFIDENTIAL-ROW-" * 50
    plain, sealed = encode(marker, KeyRing.none(), NONE), encode(marker, k1, NONE)
    assert b"CONFIDENTIAL-ROW-" in plain
    assert b"CONFIDENTIAL-ROW-" not in sealed
    assert encode(marker, k1, NONE) != sealed  # a fresh data key per object


def test_memoryview_and_bytearray_inputs(k1: KeyRing) -> None:
    obj = encode_object(memoryview(bytearray(DATA)), kind="chunk", name="c", codec=ZSTD, keyring=k1)
    assert decode_object(bytearray(obj), k1, source="chunk c")[1] == DATA


def test_read_header_from_file(tmp_path: Path, k1: KeyRing) -> None:
    path = tmp_path / "wal" / "seg"
    write_object(path, encode(DATA, k1))
    assert stat_mode(path) == 0o640
    assert read_header(path).plaintext_size == len(DATA)
    (tmp_path / "junk").write_bytes(b"KLIOOBJ1\xff\xff\xff\xff")
    with pytest.raises(CorruptObject, match="junk is corrupt: header is truncated"):
        read_header(tmp_path / "junk", source=str(tmp_path / "junk"))


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_frame_failing_authentication_is_named(k1: KeyRing) -> None:
    obj = bytearray(encode(DATA, k1))
    _, spans = frames(bytes(obj))
    _, end = spans[2]
    obj[end - 5] ^= 0x40  # the CRC of an encrypted frame covers only its fields
    with pytest.raises(CorruptObject) as err:
        decode_object(bytes(obj), k1, source=SEG)
    assert corrupt_message(err) == f"{SEG} is corrupt: frame 2 failed authentication"
    assert str(err.value) == f"{SEG} is corrupt: frame 2 failed authentication\nHINT: {HINT}"


@pytest.mark.parametrize("encrypted", [False, True])
def test_reordered_frames_are_detected(tmp_path: Path, encrypted: bool) -> None:
    keyring = ring(tmp_path) if encrypted else KeyRing.none()
    obj = encode(DATA, keyring)
    head_end, spans = frames(obj)
    (a0, a1), (b0, b1) = spans[0], spans[1]
    swapped = obj[:head_end] + obj[b0:b1] + obj[a0:a1] + obj[b1:]
    with pytest.raises(CorruptObject) as err:
        decode_object(swapped, keyring, source=SEG)
    expected = (
        "frame 0 failed authentication"
        if encrypted
        else f"frame 0 is at offset {FRAME}, expected 0"
    )
    assert corrupt_message(err) == f"{SEG} is corrupt: {expected}"


def test_frames_bound_to_their_header(k1: KeyRing) -> None:
    one, two = encode(DATA, k1), encode(DATA, k1)
    mixed = one[: frames(one)[0]] + two[frames(two)[0] :]
    with pytest.raises(CorruptObject, match="frame 0 failed authentication"):
        decode_object(mixed, k1, source=SEG)
    tampered = with_header(one, name="000000010000000000000004")
    with pytest.raises(CorruptObject, match="frame 0 failed authentication"):
        decode_object(tampered, k1, source=SEG)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda o, s: o[: s[-1][0]], "truncated (no last frame)"),
        (
            lambda o, s: o + o[s[-1][0] : s[-1][1]],
            "frame 6 claims more data than the object may hold",
        ),
        (lambda o, s: o[: s[-1][1] - 1], "frame 5 is truncated"),
        (lambda o, s: o + b"\0" * 10, "frame 6 is truncated"),
        (lambda o, s: o[:5], "too short for an object (5 bytes)"),
        (lambda o, s: b"KLIOOBJ2" + o[8:], "not a klio object (bad magic)"),
        (lambda o, s: o[:20] + bytes([o[20] ^ 1]) + o[21:], "header checksum mismatch"),
        (
            lambda o, s: o[: s[1][0] + 12] + bytes([o[s[1][0] + 12] ^ 1]) + o[s[1][0] + 13 :],
            "frame 1 failed its checksum",
        ),
    ],
    ids=["no-last", "after-last", "cut", "trailing", "short", "magic", "header-crc", "frame-crc"],
)
def test_structural_damage(k1: KeyRing, edit: object, expected: str) -> None:
    obj = encode(DATA[: 5 * FRAME + 100], k1)
    assert len(frames(obj)[1]) == 6
    with pytest.raises(CorruptObject) as err:
        decode_object(edit(obj, frames(obj)[1]), k1, source=SEG)  # type: ignore[operator]
    assert corrupt_message(err) == f"{SEG} is corrupt: {expected}"


def test_frame_after_the_last_frame() -> None:
    obj = encode(DATA[:100], KeyRing.none())
    empty = encode(b"", KeyRing.none())
    with pytest.raises(CorruptObject) as err:
        decode_object(obj + empty[frames(empty)[0] :], KeyRing.none(), source=SEG)
    assert corrupt_message(err) == f"{SEG} is corrupt: frame 1 follows the last frame"
    flagged = bytearray(obj)
    start, end = frames(obj)[1][0]
    flagged[start + 4] = 0x81
    fix_crc(flagged, start, end)
    with pytest.raises(CorruptObject, match="frame 0 has unknown flags 0x81"):
        decode_object(bytes(flagged), KeyRing.none(), source=SEG)


def test_header_checks() -> None:
    obj = encode(DATA, KeyRing.none())
    cases: dict[str, dict[str, object]] = {
        "SHA-256 of the content does not match the header": {"plaintext_sha256": "00" * 32},
        f"holds {len(DATA)} bytes, the header says {len(DATA) + 1}": {
            "plaintext_size": len(DATA) + 1
        },
        "unknown codec 'lz4'": {"codec": "lz4"},
        "negative plaintext size": {"plaintext_size": -1},
        "encrypted header lacks its wrapped key or nonce prefix": {"key_id": "k1"},
        "header has no plaintext size (an open partial: use read_partial)": {
            "plaintext_size": None
        },
    }
    for expected, change in cases.items():
        with pytest.raises(CorruptObject) as err:
            decode_object(with_header(obj, **change), KeyRing.none(), source=SEG)
        assert corrupt_message(err) == f"{SEG} is corrupt: {expected}"
    with pytest.raises(CorruptObject, match="invalid header"):
        decode_object(with_header(obj, kind=5), KeyRing.none(), source=SEG)
    with pytest.raises(CorruptObject) as newer:
        decode_object(with_header(obj, format=2), KeyRing.none(), source=SEG)
    assert newer.value.message == f"{SEG} has object format 2, this klio reads format 1"


def test_keys(tmp_path: Path, k1: KeyRing) -> None:
    obj = encode(DATA, k1)
    with pytest.raises(EncryptionKeyError) as missing:
        decode_object(obj, KeyRing.none(), source=SEG)
    assert missing.value.message == "encryption key 'k1' is not configured"
    with pytest.raises(EncryptionKeyError) as wrong:
        decode_object(obj, ring(tmp_path, "k1"), source=SEG)
    assert wrong.value.message == f"cannot decrypt {SEG} with key 'k1': wrong key or corrupt header"
    # rotation: objects written under k1 stay readable once k2 is active
    k1_file = next(tmp_path.glob("key-k1-*"))
    k2_file = tmp_path / "k2"
    k2_file.write_bytes(os.urandom(32))
    rotated = KeyRing.load("k2", {"k1": k1_file, "k2": k2_file})
    if rotated.get("k1") == k1.get("k1"):
        assert decode_object(obj, rotated, source=SEG)[1] == DATA
        assert read_header(encode(b"x", rotated)).key_id == "k2"


def test_size_limits() -> None:
    obj = encode(DATA, KeyRing.none())
    with pytest.raises(
        CorruptObject, match=f"declares {len(DATA)} bytes, more than the maximum 1000"
    ):
        decode_object(obj, KeyRing.none(), source=SEG, max_size=1000)


def test_decompression_bomb_in_a_frame_is_refused() -> None:
    """A frame whose zstd data declares far more than its frame says is never inflated."""
    obj = bytearray(encode(b"x" * 10, KeyRing.none()))
    _, [(start, _)] = frames(bytes(obj))
    bomb = zstandard.ZstdCompressor().compress(bytes(256 << 20))
    fields = struct.pack(">IBQI", len(bomb), 1, 0, 10)
    frame = fields + struct.pack(">I", zlib.crc32(bomb, zlib.crc32(fields))) + bomb
    with pytest.raises(CorruptObject) as err:
        decode_object(bytes(obj[:start]) + frame, KeyRing.none(), source=SEG)
    assert corrupt_message(err) == (
        f"{SEG} is corrupt: frame 0 cannot be decompressed: "
        "zstd frame declares 268435456 bytes, more than 10"
    )


def test_frames_claiming_more_than_the_object_are_refused() -> None:
    obj = bytearray(encode(b"y" * 10, KeyRing.none(), NONE))
    _, [(start, end)] = frames(bytes(obj))
    obj[start + 13 : start + 17] = struct.pack(">I", 1 << 30)
    fix_crc(obj, start, end)
    with pytest.raises(CorruptObject, match="frame 0 claims more data than the object may hold"):
        decode_object(bytes(obj), KeyRing.none(), source=SEG)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=20_000),
    frame_size=st.integers(1, 9000),
    encrypted=st.booleans(),
    codec=st.sampled_from(["zstd", "none"]),
)
def test_property_round_trip(data: bytes, frame_size: int, encrypted: bool, codec: str) -> None:
    keyring = PROPERTY_RING if encrypted else KeyRing.none()
    obj = encode_object(
        data,
        kind="chunk",
        name="c",
        codec=compression.get(codec),
        keyring=keyring,
        frame_size=frame_size,
    )
    header, out = decode_object(obj, keyring, source="chunk c")
    assert out == data and header.plaintext_size == len(data)


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 10**9), bit=st.integers(0, 7), encrypted=st.booleans())
def test_property_any_bit_flip_is_detected(position: int, bit: int, encrypted: bool) -> None:
    keyring = PROPERTY_RING if encrypted else KeyRing.none()
    obj = bytearray(PROPERTY_OBJECTS[encrypted])
    obj[position % len(obj)] ^= 1 << bit
    with pytest.raises(CorruptObject):
        decode_object(bytes(obj), keyring, source="chunk c")


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(0, 10**9), encrypted=st.booleans())
def test_property_any_truncation_is_detected(cut: int, encrypted: bool) -> None:
    keyring = PROPERTY_RING if encrypted else KeyRing.none()
    obj = PROPERTY_OBJECTS[encrypted]
    with pytest.raises(CorruptObject):
        decode_object(obj[: cut % len(obj)], keyring, source="chunk c")


def _property_ring() -> KeyRing:
    directory = Path(os.environ.get("TMPDIR", "/tmp"))
    path = directory / f"klio-test-key-{os.getpid()}-{os.urandom(4).hex()}"
    path.write_bytes(os.urandom(32))
    try:
        return KeyRing.load("kp", {"kp": path})
    finally:
        path.unlink()


PROPERTY_RING = _property_ring()
PROPERTY_OBJECTS = {
    enc: encode_object(
        DATA[:9000],
        kind="chunk",
        name="c",
        codec=ZSTD,
        keyring=PROPERTY_RING if enc else KeyRing.none(),
        frame_size=2000,
    )
    for enc in (False, True)
}


def test_header_type_is_frozen() -> None:
    header = read_header(encode(b"abc", KeyRing.none()))
    assert isinstance(header, ObjectHeader)
    with pytest.raises(AttributeError):
        header.name = "other"  # type: ignore[misc]
