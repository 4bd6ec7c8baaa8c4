"""PartialWriter with ``preallocate``: zeros ahead of the frames, data-only syncs, same reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from klio_common import compression
from klio_common.crypto import KeyRing
from klio_common.partial import PartialWriter, read_partial
from tests.unit.test_objects import ring

AHEAD = 64 * 1024


def writer(path: Path, keyring: KeyRing, ahead: int = AHEAD) -> PartialWriter:
    return PartialWriter.create(
        path,
        name="000000010000000000000003",
        codec=compression.get("zstd", 1),
        keyring=keyring,
        frame_size=4096,
        preallocate=ahead,
    )


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "aes"])
def test_zero_filled_partials_read_back_exactly(tmp_path: Path, encrypted: bool) -> None:
    keys = ring(tmp_path) if encrypted else KeyRing.load(None, {})
    path = tmp_path / "seg.partial"
    data = os.urandom(200_000)  # incompressible: frames cross the zero-filled end several times
    w = writer(path, keys)
    sizes = []
    for start in range(0, len(data), 7000):
        w.append(start, data[start : start + 7000])
        w.sync()
        sizes.append(path.stat().st_size)
        _, plain, valid_end = read_partial(path, keys, source="p")
        end = min(start + 7000, len(data))
        assert valid_end == end and bytes(plain) == data[:end]
    w.close()
    assert sizes[0] >= AHEAD  # allocated ahead at once, not frame by frame
    assert len(set(sizes)) < len(sizes) // 4  # the size rarely changes: syncs flush data only
    assert path.read_bytes().endswith(bytes(1024))  # the zeros are still ahead of the frames


def test_without_preallocation_the_file_ends_at_the_last_frame(tmp_path: Path) -> None:
    path = tmp_path / "seg.partial"
    w = writer(path, KeyRing.load(None, {}), ahead=0)
    w.append(0, os.urandom(10_000))
    w.close()
    assert not path.read_bytes().endswith(bytes(64))
    assert read_partial(path, KeyRing.load(None, {}), source="p")[2] == 10_000
