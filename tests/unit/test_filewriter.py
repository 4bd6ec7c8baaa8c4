"""The restore's file writer: direct where the filesystem allows, byte-exact either way."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from klio_restore.filewriter import ALIGN, FileWriter


def _file(path: Path, size: int) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    os.close(fd)
    return path


def _supports_direct(directory: Path) -> bool:
    probe = directory / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        return False
    finally:
        probe.unlink()
    return True


@pytest.mark.parametrize(
    ("offset", "sizes"),
    [
        (0, [ALIGN * 32, ALIGN * 32]),  # aligned: all direct
        (ALIGN * 4, [ALIGN * 3, 1000]),  # an unaligned tail goes through the cache
        (0, [100, ALIGN * 2 + 7, 5]),  # pieces that straddle blocks
        (123, [ALIGN * 2]),  # an unaligned offset: buffered
        (0, [17]),  # less than a block
    ],
)
def test_spans_land_byte_exact(tmp_path: Path, offset: int, sizes: list[int]) -> None:
    pieces = [os.urandom(n) for n in sizes]
    total = sum(sizes)
    path = _file(tmp_path / "f", offset + total + ALIGN)
    writer = FileWriter()
    assert writer.write(path, offset, pieces) == total
    data = path.read_bytes()
    assert data[offset : offset + total] == b"".join(pieces)
    assert data[:offset] == bytes(offset)
    assert data[offset + total :] == bytes(ALIGN)
    assert writer.direct == _supports_direct(tmp_path)


@pytest.mark.parametrize("refuses_at", ["open", "write"])
def test_a_filesystem_without_direct_io_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuses_at: str
) -> None:
    real_open, real_pwrite = os.open, os.pwrite
    direct_fds: set[int] = set()
    refusals: list[str] = []

    def refusing_open(path: object, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT and refuses_at == "open":
            refusals.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags & ~os.O_DIRECT, *args)  # type: ignore[arg-type]
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        else:
            direct_fds.discard(fd)
        return fd

    def refusing_pwrite(fd: int, data: memoryview, offset: int) -> int:
        if fd in direct_fds:
            refusals.append("write")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    path = _file(tmp_path / "f", ALIGN * 8)
    writer = FileWriter()
    piece = os.urandom(ALIGN * 8)
    writer.write(path, 0, [piece])
    assert not writer.direct
    assert path.read_bytes() == piece
    writer.write(path, 0, [piece[::-1]])  # the next span goes buffered straight away
    assert path.read_bytes() == piece[::-1]
    assert refusals == [refuses_at]


def test_buffered_only_when_asked(tmp_path: Path) -> None:
    path = _file(tmp_path / "f", ALIGN * 2)
    writer = FileWriter(direct=False)
    writer.write(path, 0, [b"x" * ALIGN * 2])
    assert not writer.direct
    assert path.read_bytes() == b"x" * ALIGN * 2


def test_one_buffer_per_thread_grows(tmp_path: Path) -> None:
    path = _file(tmp_path / "f", ALIGN * 64)
    writer = FileWriter()
    small, big = os.urandom(ALIGN), os.urandom(ALIGN * 64)
    writer.write(path, 0, [small])
    writer.write(path, 0, [big])
    assert path.read_bytes() == big
