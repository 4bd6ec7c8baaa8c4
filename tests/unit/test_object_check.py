"""Tests for klio_common.objects.check_object: every stored byte checked, nothing decompressed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from klio_common import compression
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject, EncryptionKeyError
from klio_common.objects import check_object, decode_object
from tests.unit.test_objects import DATA, ZSTD, encode, frames, ring, with_header


@pytest.fixture
def k1(tmp_path: Path) -> KeyRing:
    return ring(tmp_path)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
def test_an_intact_object_passes_and_returns_its_header(k1: KeyRing, encrypted: bool) -> None:
    keys = k1 if encrypted else KeyRing.load(None, {})
    obj = encode(DATA, keys)
    header = check_object(obj, keys, source="segment")
    assert header == decode_object(obj, keys, source="segment")[0]
    assert header.plaintext_size == len(DATA)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
def test_any_changed_byte_is_refused(k1: KeyRing, encrypted: bool) -> None:
    keys = k1 if encrypted else KeyRing.load(None, {})
    obj = encode(DATA, keys)
    _, spans = frames(obj)
    # One byte in the header, in a frame's fields, in a payload, in the last frame's tail.
    for pos in (20, spans[3][0] + 2, spans[5][0] + 40, len(obj) - 1):
        damaged = bytearray(obj)
        damaged[pos] ^= 0x01
        with pytest.raises(CorruptObject):
            check_object(bytes(damaged), keys, source="segment")


def test_truncation_and_a_missing_last_frame_are_refused(k1: KeyRing) -> None:
    obj = encode(DATA, k1)
    _, spans = frames(obj)
    with pytest.raises(CorruptObject, match="truncated"):
        check_object(obj[: spans[-1][0]], k1, source="segment")
    with pytest.raises(CorruptObject, match="truncated"):
        check_object(obj[:-3], k1, source="segment")


def test_a_header_that_lies_about_the_size_is_refused(k1: KeyRing) -> None:
    obj = with_header(encode(DATA, KeyRing.load(None, {})), plaintext_size=len(DATA) + 1)
    with pytest.raises(CorruptObject, match="holds"):
        check_object(obj, KeyRing.load(None, {}), source="segment")


def test_the_wrong_key_is_an_encryption_error(tmp_path: Path, k1: KeyRing) -> None:
    obj = encode(DATA, k1)
    other = ring(tmp_path, "k1", os.urandom(32))
    with pytest.raises((EncryptionKeyError, CorruptObject)):
        check_object(obj, other, source="segment")


def test_nothing_is_decompressed(k1: KeyRing, monkeypatch: pytest.MonkeyPatch) -> None:
    obj = encode(DATA, k1, ZSTD)

    def refuse(self: object, data: bytes, size: int) -> bytes:
        raise AssertionError("check_object decompressed a frame")

    monkeypatch.setattr(type(compression.get("zstd")), "decompress", refuse)
    check_object(obj, k1, source="segment")
