"""PartialWriter with ``preallocate``: zeros ahead of the frames, data-only syncs, same reads."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from klio_common import compression, partial
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


def sync_writer(path: Path, keyring: KeyRing, direct: bool = False) -> PartialWriter:
    """A synchronous standby's: frames not compressed, zero-filled ahead."""
    return PartialWriter.create(
        path,
        name="000000010000000000000003",
        codec=compression.get("none"),
        keyring=keyring,
        preallocate=AHEAD,
        direct=direct,
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


def test_append_sync_writes_with_rwf_dsync_and_falls_back_when_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = ring(tmp_path)
    path = tmp_path / "seg.partial"
    w = sync_writer(path, keys)
    w.sync()  # published: append_sync takes its short path from now on
    real, flags_seen = os.pwritev, []
    refuse = {"on": False}

    def pwritev(fd: int, buffers: list[bytes], offset: int, flags: int = 0) -> int:
        flags_seen.append(flags)
        if flags and refuse["on"]:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setitem(partial._dsync, "flags", os.RWF_DSYNC)
    data = os.urandom(9000)
    w.append_sync(0, memoryview(data)[:3000])
    assert flags_seen == [os.RWF_DSYNC]  # one system call: the write and its fdatasync
    refuse["on"] = True
    w.append_sync(3000, memoryview(data)[3000:6000])
    w.append_sync(6000, memoryview(data)[6000:])
    assert flags_seen == [os.RWF_DSYNC, os.RWF_DSYNC, 0, 0]  # refused once, then plain writes
    w.close()
    _, plain, valid_end = read_partial(path, keys, source="p")
    assert valid_end == len(data)
    assert bytes(plain[:valid_end]) == data


@pytest.mark.parametrize("encrypted", [True, False], ids=["sealed", "plain"])
def test_a_prepared_partials_first_append_sync_is_one_direct_write_then_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encrypted: bool
) -> None:
    # A synchronous standby's segment switch: the next segment's .partial was created and
    # zero-filled ahead (header durable); its first commit must not pay a buffered write and
    # an fdatasync on top of the direct write before the file is published. Without
    # encryption too: plain frames take the same path.
    keys = ring(tmp_path) if encrypted else KeyRing.none()
    path = tmp_path / "seg.partial"
    w = sync_writer(path, keys, direct=True)
    assert w.direct_io and not path.exists()
    calls: list[str] = []

    def recorded(name: str) -> Callable[..., Any]:
        real = getattr(os, name)

        def call(*args: Any) -> Any:
            calls.append(name)
            return real(*args)

        return call

    for name in ("fdatasync", "fsync", "pwrite", "preadv"):  # preadv: the block's reload
        monkeypatch.setattr(os, name, recorded(name))
    data = os.urandom(5000)
    w.append_sync(0, memoryview(data)[:3000])
    assert path.exists() and calls == ["fsync"]  # the directory's, after the rename: no more
    w.append_sync(3000, memoryview(data)[3000:])
    assert calls == ["fsync"]
    monkeypatch.undo()
    w.close()
    _, plain, valid_end = read_partial(path, keys, source="p")
    assert valid_end == len(data) and bytes(plain[:valid_end]) == data
    assert not list(tmp_path.glob("*.tmp*"))
