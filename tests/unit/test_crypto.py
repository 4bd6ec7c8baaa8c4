"""Tests for klio_common.crypto."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from klio_common.crypto import KEY_SIZE, KeyRing, new_data_key
from klio_common.errors import ConfigError, EncryptionKeyError


def key_file(directory: Path, name: str, content: bytes | None = None) -> Path:
    path = directory / name
    path.write_bytes(os.urandom(KEY_SIZE) if content is None else content)
    return path


def test_load_reads_keys(tmp_path: Path) -> None:
    k1, k2 = key_file(tmp_path, "k1"), key_file(tmp_path, "k2")
    ring = KeyRing.load("k2", {"k1": k1, "k2": k2})
    assert ring.active == "k2"
    assert ring.key_ids == {"k1", "k2"}
    assert ring.get("k1") == k1.read_bytes()


def test_load_collects_every_problem(tmp_path: Path) -> None:
    files = {
        "good": key_file(tmp_path, "good"),
        "short": key_file(tmp_path, "short", b"x" * 31),
        "newline": key_file(tmp_path, "newline", os.urandom(32) + b"\n"),
        "gone": tmp_path / "missing",
        "dir": tmp_path,
        "bad id": key_file(tmp_path, "other"),
    }
    with pytest.raises(ConfigError) as err:
        KeyRing.load("k9", files)
    problems = err.value.problems
    assert len(problems) == 6, problems
    assert problems[0].startswith("encryption.keys.short: key file ")
    assert "has 31 bytes, expected exactly 32" in problems[0]
    assert "has 33 bytes" in problems[1]
    assert problems[2] == f"encryption.keys.gone: key file {tmp_path / 'missing'} does not exist"
    assert problems[3].startswith(f"encryption.keys.dir: cannot read key file {tmp_path}")
    assert problems[4].startswith("encryption.keys: key id 'bad id' is invalid")
    assert problems[5] == (
        "encryption.active: key 'k9' is not in encryption.keys "
        "(configured: bad id, dir, gone, good, newline, short)"
    )


def test_active_without_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'k1' is not in encryption.keys \(configured: none"):
        KeyRing.load("k1", {})


def test_none_and_read_only_rings(tmp_path: Path) -> None:
    assert KeyRing.none().active is None
    assert KeyRing.none().key_ids == frozenset()
    ring = KeyRing.load(None, {"old": key_file(tmp_path, "old")})
    assert ring.active is None and ring.key_ids == {"old"}


def test_missing_key_error() -> None:
    with pytest.raises(EncryptionKeyError) as err:
        KeyRing.none().get("k2")
    assert err.value.message == "encryption key 'k2' is not configured"
    assert err.value.hint == "add the key file that wrote this object under encryption.keys"
    with pytest.raises(EncryptionKeyError, match="'k2' is not configured"):
        KeyRing.none().unwrap("k2", b"x" * 60)
    with pytest.raises(EncryptionKeyError, match="'k2' is not configured"):
        KeyRing.none().wrap(new_data_key(), "k2")


def test_wrap_unwrap(tmp_path: Path) -> None:
    ring = KeyRing.load("k1", {"k1": key_file(tmp_path, "k1")})
    data_key = new_data_key()
    assert len(data_key) == KEY_SIZE and new_data_key() != data_key
    wrapped = ring.wrap(data_key, "k1")
    assert len(wrapped) == 60 and data_key not in wrapped
    assert ring.wrap(data_key, "k1") != wrapped  # fresh nonce every time
    assert ring.unwrap("k1", wrapped) == data_key


def test_wrong_key_or_corrupt_wrapped_key(tmp_path: Path) -> None:
    secret = os.urandom(KEY_SIZE)
    writer = KeyRing.load("k1", {"k1": key_file(tmp_path, "a", secret)})
    wrapped = writer.wrap(new_data_key(), "k1")
    other = KeyRing.load(None, {"k1": key_file(tmp_path, "b")})
    # same key bytes under another id: the AAD binds the id, so this fails too
    renamed = KeyRing.load(None, {"k2": key_file(tmp_path, "c", secret)})
    flipped = bytearray(wrapped)
    flipped[20] ^= 1
    cases = [(other, "k1", wrapped), (renamed, "k2", wrapped), (writer, "k1", bytes(flipped))]
    cases.append((writer, "k1", wrapped[:-1]))
    for ring, key_id, blob in cases:
        with pytest.raises(EncryptionKeyError) as err:
            ring.unwrap(key_id, blob, what="segment 000000010000000000000003")
        assert err.value.message == (
            f"cannot decrypt segment 000000010000000000000003 with key '{key_id}': "
            "wrong key or corrupt header"
        )


def test_repr_hides_keys(tmp_path: Path) -> None:
    secret = os.urandom(KEY_SIZE)
    ring = KeyRing.load("k1", {"k1": key_file(tmp_path, "k1", secret)})
    assert secret.hex() not in repr(ring) and repr(secret) not in repr(ring)
    assert "k1" in repr(ring)
