"""Direct, durable appends (`klio_common.directio`) and the partial writer's use of them."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from klio_common import compression
from klio_common.crypto import KeyRing
from klio_common.directio import BLOCK, DirectTail
from klio_common.errors import KlioError
from klio_common.frames import FRAME_HEAD, Sealer, new_header
from klio_common.partial import PartialWriter, read_partial
from tests.unit.test_objects import ring

ZEROED = 64 * 1024


def zeroed_file(path: Path, size: int = ZEROED) -> None:
    path.write_bytes(bytes(size))


def test_appends_land_at_their_offsets_whatever_the_block_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "f"
    zeroed_file(path)
    tail = DirectTail.open(path, 10_000, zeros_at=ZEROED - BLOCK)
    assert tail is not None
    expected = bytearray(ZEROED)
    end = 100  # the file's content starts mid-block, as frames follow a header
    expected[:end] = os.urandom(end)
    with path.open("r+b") as f:
        f.write(expected[:end])
    for size in (1, 700, 3996, 4096, 8192, 9000, 5, 4091):
        data = os.urandom(size)
        tail.space(end, size)[:] = data
        tail.append(size)
        expected[end : end + size] = data
        end += size
        assert path.read_bytes() == expected  # nothing else changed, zeros kept after the end
    tail.close()
    tail.close()  # idempotent


def test_a_write_by_another_descriptor_is_read_back_before_the_next_append(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f"
    zeroed_file(path)
    tail = DirectTail.open(path, 4096, zeros_at=0)
    assert tail is not None
    tail.space(0, 10)[:] = b"a" * 10
    tail.append(10)
    with path.open("r+b") as f:  # the page cache's copy, as PartialWriter's general path writes
        f.seek(10)
        f.write(b"b" * 20)
    tail.invalidate()
    tail.space(30, 5)[:] = b"c" * 5
    tail.append(5)
    assert path.read_bytes()[:40] == b"a" * 10 + b"b" * 20 + b"c" * 5 + bytes(5)
    with pytest.raises(ValueError, match="over the direct tail"):
        tail.space(35, 4097)
    tail.close()


def test_a_refused_probe_gives_no_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    zeroed_file(path)
    opened: list[int] = []
    real_open, real_close = os.open, os.close

    def track_open(p: object, flags: int, *args: int) -> int:
        fd = real_open(p, flags, *args)  # type: ignore[arg-type]
        opened.append(fd)
        return fd

    monkeypatch.setattr(os, "open", track_open)
    monkeypatch.setattr(os, "pwritev", _failing(errno.EINVAL))
    assert DirectTail.open(path, 4096, zeros_at=0) is None
    with pytest.raises(OSError):
        real_close(opened[0])  # the probe's descriptor was closed
    monkeypatch.setattr(os, "pwritev", _failing(errno.EIO))
    with pytest.raises(OSError, match="Input/output"):
        DirectTail.open(path, 4096, zeros_at=0)  # not a refusal: the error is the caller's


def _failing(code: int) -> Callable[..., int]:
    def pwritev(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        raise OSError(code, os.strerror(code))

    return pwritev


@pytest.mark.parametrize("encrypted", [True, False])
def test_seal_into_builds_the_frame_seal_builds(tmp_path: Path, encrypted: bool) -> None:
    keys = ring(tmp_path) if encrypted else KeyRing.none()
    header, key = new_header(
        kind="partial", name="n", codec=compression.get("none"), keyring=keys, size=None,
        sha=None, extra=None,
    )  # fmt: skip
    sealer = Sealer(header, key)
    assert sealer.tag_size == (16 if encrypted else 0)
    data = memoryview(os.urandom(777))
    buf = bytearray(FRAME_HEAD + 777 + sealer.tag_size)
    sealer.seal_into(memoryview(buf), 5, 1234, data)
    assert bytes(buf) == b"".join(sealer.seal(5, 0, 1234, 777, data))


def direct_writer(path: Path, keys: KeyRing, *, direct: bool = True) -> PartialWriter:
    return PartialWriter.create(
        path,
        name="000000010000000000000003",
        codec=compression.get("none"),
        keyring=keys,
        frame_size=16_384,
        preallocate=ZEROED,
        direct=direct,
    )


@pytest.mark.parametrize("encrypted", [True, False], ids=["sealed", "plain"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_synchronous_appends_read_back_exactly(
    tmp_path: Path, direct: bool, encrypted: bool
) -> None:
    keys = ring(tmp_path) if encrypted else KeyRing.none()
    path = tmp_path / "seg.partial"
    w = direct_writer(path, keys, direct=direct)
    data = os.urandom(300_000)
    w.append_sync(0, memoryview(data)[:1000])  # the general path: publishes, zero-fills, probes
    assert w.direct_io is direct
    pos = 1000
    for size in (1, 700, 4000, 20_000, 8192, 3, 50_000, 9000):  # 20_000 and 50_000: split frames
        w.append_sync(pos, memoryview(data)[pos : pos + size])
        pos += size
        _, plain, valid_end = read_partial(path, keys, source="p")
        assert valid_end == pos and bytes(plain) == data[:pos]
    while pos < len(data):  # past the zero-filled end, more than once
        w.append_sync(pos, memoryview(data)[pos : pos + 6000])
        pos = min(pos + 6000, len(data))
    w.close()
    _, plain, valid_end = read_partial(path, keys, source="p")
    assert valid_end == len(data) and bytes(plain) == data
    assert path.read_bytes().endswith(bytes(1024))  # zeros still ahead of the frames


def test_a_failed_direct_write_fails_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = ring(tmp_path)
    path = tmp_path / "seg.partial"
    w = direct_writer(path, keys)
    w.append_sync(0, memoryview(b"x" * 100))
    assert w.direct_io
    monkeypatch.setattr(os, "pwritev", _failing(errno.EIO))
    with pytest.raises(OSError, match="Input/output"):
        w.append_sync(100, memoryview(b"y" * 100))
    with pytest.raises(KlioError, match="failed earlier"):
        w.append_sync(100, memoryview(b"y" * 100))
    w.abandon()
    _, plain, valid_end = read_partial(path, keys, source="p")
    assert valid_end == 100 and bytes(plain) == b"x" * 100  # what was acknowledged is kept
