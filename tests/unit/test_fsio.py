"""Tests for klio_common.fsio."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from klio_common import fsio
from klio_common.errors import ConflictError, Retryable


@pytest.fixture
def umask() -> Iterator[None]:
    """Run with a hostile umask, to show modes do not depend on it."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def temps(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if fsio.is_temp_name(p.name)]


def test_atomic_write_creates_file_and_parents(tmp_path: Path, umask: None) -> None:
    target = tmp_path / "a" / "b" / "obj"
    fsio.atomic_write(target, b"hello", file_mode=0o644, dir_mode=0o755)
    assert target.read_bytes() == b"hello"
    assert mode(target) == 0o644
    assert mode(tmp_path / "a") == 0o755 and mode(tmp_path / "a" / "b") == 0o755
    assert temps(target.parent) == []


def test_atomic_write_default_modes_and_replace(tmp_path: Path, umask: None) -> None:
    target = tmp_path / "d" / "obj"
    fsio.atomic_write(target, b"one")
    fsio.atomic_write(target, memoryview(b"two two"))
    assert target.read_bytes() == b"two two"
    assert mode(target) == 0o640 and mode(target.parent) == 0o750
    assert temps(target.parent) == []


def test_new_directories_keep_inherited_setgid(tmp_path: Path) -> None:
    root = tmp_path / "tier1"
    root.mkdir()
    root.chmod(0o2750)
    fsio.atomic_write(root / "c1" / "wal" / "seg", b"x")
    for d in (root / "c1", root / "c1" / "wal"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o2750


def test_ensure_dir_leaves_existing_directories_alone(tmp_path: Path) -> None:
    existing = tmp_path / "e"
    existing.mkdir(mode=0o700)
    fsio.ensure_dir(existing / "new", 0o750)
    assert mode(existing) == 0o700 and mode(existing / "new") == 0o750
    fsio.ensure_dir(existing / "new", 0o700)
    assert mode(existing / "new") == 0o750


def test_ensure_dir_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(OSError):
        fsio.ensure_dir(tmp_path / "f" / "sub")


def test_fsync_dir(tmp_path: Path) -> None:
    fsio.fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsio.fsync_dir(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsio.fsync_dir(tmp_path / "file")


def full_disk(monkeypatch: pytest.MonkeyPatch, after: int = 0) -> None:
    """Make writes fail with ENOSPC after ``after`` bytes, as on a full volume."""
    real = os.write
    budget = [after]

    def write(fd: int, data: bytes) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, memoryview(data)[: budget[0]])
        budget[0] -= n
        return n

    monkeypatch.setattr(os, "write", write)


def test_full_disk_is_retryable_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "obj"
    fsio.atomic_write(target, b"old")
    full_disk(monkeypatch, after=10)
    with pytest.raises(Retryable) as err:
        fsio.atomic_write(target, b"new content that does not fit")
    assert err.value.message.startswith(f"no space left on device writing {target}")
    assert err.value.hint == "free space on the Tier-1 volume or grow it; nothing was written"
    assert target.read_bytes() == b"old"
    assert temps(tmp_path) == []
    with pytest.raises(Retryable):
        fsio.write_exclusive(tmp_path / "other", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj"]


def test_remove_stale_temps(tmp_path: Path) -> None:
    names = [".seg.tmp-1a2b", ".x.partial.tmp-ff", "seg", ".hidden", "a.tmp-1"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".dir.tmp-1").mkdir()
    removed = fsio.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".seg.tmp-1a2b", ".x.partial.tmp-ff"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dir.tmp-1", ".hidden", "a.tmp-1", "seg"]
    assert fsio.remove_stale_temps(tmp_path / "missing") == []


def test_write_exclusive(tmp_path: Path, umask: None) -> None:
    target = tmp_path / "wal" / "seg"
    assert fsio.write_exclusive(target, b"content") is True
    assert mode(target) == 0o640 and target.stat().st_nlink == 1
    assert fsio.write_exclusive(target, b"content") is False
    with pytest.raises(ConflictError) as err:
        fsio.write_exclusive(target, b"other!!")
    assert err.value.message == f"{target} already exists with different content"
    with pytest.raises(ConflictError):
        fsio.write_exclusive(target, b"content and more")
    assert target.read_bytes() == b"content"
    assert temps(target.parent) == []


def test_write_exclusive_custom_sameness(tmp_path: Path) -> None:
    target = tmp_path / "obj"
    fsio.write_exclusive(target, b"v1:abc")

    def write(data: bytes) -> bool:
        return fsio.write_exclusive(target, data, same=lambda p: p.read_bytes()[3:] == data[3:])

    assert write(b"v2:abc") is False
    with pytest.raises(ConflictError):
        write(b"v1:xyz")
    assert target.read_bytes() == b"v1:abc"


def test_write_exclusive_races_have_one_winner(tmp_path: Path) -> None:
    target = tmp_path / "seg"
    results: list[object] = []
    barrier = threading.Barrier(8)

    def contend(n: int) -> None:
        barrier.wait()
        try:
            results.append(
                fsio.write_exclusive(target, b"A" * 100_000 if n % 2 else b"B" * 100_000)
            )
        except ConflictError as exc:
            results.append(exc)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    winner = target.read_bytes()[:1]
    assert winner in (b"A", b"B") and target.read_bytes() == winner * 100_000
    assert results.count(False) == 3
    assert sum(isinstance(r, ConflictError) for r in results) == 4
    assert temps(tmp_path) == []


WRITER = """
import sys
from pathlib import Path
from klio_common import fsio
target = Path(sys.argv[1])
i = 0
while True:
    fsio.atomic_write(target, bytes([65 + i % 2]) * (4 << 20))
    i += 1
    if i == 3:
        print("ready", flush=True)
"""


def test_atomic_write_survives_being_killed(tmp_path: Path) -> None:
    target = tmp_path / "obj"
    args = [sys.executable, "-c", WRITER, str(target)]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
            # let it get into further writes, then kill it wherever it is
            deadline = time.monotonic() + 30
            first = target.stat().st_ino
            while target.stat().st_ino == first and time.monotonic() < deadline:
                pass
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
    data = target.read_bytes()
    assert data in (b"A" * (4 << 20), b"B" * (4 << 20))
    fsio.remove_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["obj"]


@pytest.mark.parametrize("size", [fsio.DIRECT_MIN, 5 * (1 << 20) + 12_345])
def test_a_direct_write_holds_exactly_the_bytes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)  # more than one aligned buffer, and a padded last block
    assert fsio.write_exclusive(tmp_path / "seg", data, direct=True)
    assert (tmp_path / "seg").read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if fsio.is_temp_name(p.name)]


def test_a_direct_write_goes_around_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[bool] = []
    real = fsio.write_direct

    def spy(fd: int, data: bytes) -> bool:
        used.append(real(fd, data))
        return used[-1]

    monkeypatch.setattr(fsio, "write_direct", spy)
    fsio.write_exclusive(tmp_path / "small", b"x" * 100, direct=True)
    fsio.write_exclusive(tmp_path / "big", b"y" * fsio.DIRECT_MIN, direct=True)
    assert used == [False, True]  # ext4 takes O_DIRECT; a small file is not worth it


def test_a_filesystem_refusing_direct_writes_gets_buffered_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fsio._direct, "ok", True)

    def refuse(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # as FUSE or NFS may answer

    monkeypatch.setattr(os, "pwrite", refuse)
    data = os.urandom(fsio.DIRECT_MIN + 1)
    assert fsio.write_exclusive(tmp_path / "seg", data, direct=True)
    assert (tmp_path / "seg").read_bytes() == data
    assert fsio._direct["ok"] is False  # not tried again


def test_a_full_disk_under_a_direct_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(Retryable, match="no space left on device"):
        fsio.write_exclusive(tmp_path / "seg", os.urandom(fsio.DIRECT_MIN), direct=True)
    assert list(tmp_path.iterdir()) == []


def test_a_direct_write_cut_short_by_a_filling_device_keeps_direct_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fsio._direct, "ok", True)
    real = os.pwrite
    calls: list[int] = []

    def filling(fd: int, data: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 1:  # what fits: the kernel writes part of it and returns the count
            return real(fd, data[: fsio.DIRECT_ALIGN], offset)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", filling)
    with pytest.raises(Retryable, match="no space left on device"):
        fsio.write_exclusive(tmp_path / "seg", os.urandom(fsio.DIRECT_MIN), direct=True)
    assert calls == [0, fsio.DIRECT_ALIGN]  # the rest was tried, and the device said why
    assert list(tmp_path.iterdir()) == []
    assert fsio._direct["ok"] is True  # a full device is not a refusal of direct I/O
