"""Chunk ids: one pass over the plaintext, keyed with encryption; older ids still verify."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from klio_common.catalog.chunks import ChunkStore, holds, identify
from klio_common.compression import get as get_codec
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject
from klio_common.objects import decode_object, encode_object

DATA = os.urandom(100_000)


def _keyring() -> KeyRing:
    return KeyRing("k1", {"k1": bytes(range(32))})


def test_without_a_key_the_id_is_the_sha256() -> None:
    chunk_id, sha = identify(None, DATA)
    assert chunk_id == sha == hashlib.sha256(DATA).hexdigest()


def test_with_a_key_the_id_is_an_hmac_of_the_sha256() -> None:
    key = b"k" * 32
    chunk_id, sha = identify(key, DATA)
    assert sha == hashlib.sha256(DATA).hexdigest()
    assert chunk_id == hmac.new(key, bytes.fromhex(sha), hashlib.sha256).hexdigest()
    assert identify(b"j" * 32, DATA)[0] != chunk_id  # another key, another id


def test_stored_chunks_verify_and_carry_the_given_sha(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, _keyring(), get_codec("zstd", 1))
    chunk_id, sha = store.identify(DATA)
    store.put(chunk_id, DATA, sha256=sha)
    assert store.get(chunk_id) == DATA
    header, _ = decode_object(store.path(chunk_id).read_bytes(), store.keyring, source="t")
    assert header.plaintext_sha256 == sha


def test_chunks_named_the_earlier_way_still_verify(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, _keyring(), get_codec("zstd", 1))
    key = store._dedup_key()
    assert key is not None
    legacy = hmac.new(key, DATA, hashlib.sha256).hexdigest()  # before 2026-11-25
    store.put(legacy, DATA)
    assert store.get(legacy) == DATA


def test_a_chunk_under_another_id_is_refused(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, _keyring(), get_codec("zstd", 1))
    other = store.chunk_id(b"other content")
    store.put(other, DATA)  # the header names it, the content does not match
    with pytest.raises(CorruptObject, match="does not hold the content its id names"):
        store.get(other)


@pytest.mark.parametrize("key", [None, b"k" * 32])
def test_holds_checks_the_header_digest(key: bytes | None) -> None:
    chunk_id, _ = identify(key, DATA)
    blob = encode_object(
        DATA, kind="chunk", name=chunk_id, codec=get_codec("none", 0), keyring=KeyRing.none()
    )
    header, data = decode_object(blob, KeyRing.none(), source="t")
    assert holds(key, chunk_id, data, header)
    assert not holds(key, identify(key, b"x")[0], data, header)
