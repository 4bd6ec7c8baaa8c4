"""A synchronous standby's SegmentWriter: segment switches never wait for the previous object."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.partial import PartialWriter, read_partial
from klio_common.pg.walname import WalSegment
from klio_wal_receiver.announcer import ClosedSegment
from klio_wal_receiver.receiver import recover
from klio_wal_receiver.segments import SegmentWriter
from tests.unit.test_objects import ring

SEG = 1 << 20  # the smallest wal_segment_size


def sync_writer(
    root: Path, keys: KeyRing, on_closed: list[ClosedSegment], gate: threading.Event | None = None
) -> SegmentWriter:
    def closed(c: ClosedSegment) -> None:
        if gate is not None:
            assert gate.wait(30)
        on_closed.append(c)

    archive = WalArchive(root / "tier1", "c1")
    return SegmentWriter(archive, keys, compression.get("zstd", 1), SEG, closed, synchronous=True)


def leftovers(writer: SegmentWriter) -> list[str]:
    return sorted(p.name for p in writer.archive.open_dir.iterdir())


def test_next_segment_is_durable_while_the_previous_object_is_written(tmp_path: Path) -> None:
    keys = ring(tmp_path)
    closed: list[ClosedSegment] = []
    gate = threading.Event()  # holds the worker inside the first close
    writer = sync_writer(tmp_path, keys, closed, gate)
    first = WalSegment.from_lsn(1, 5 * SEG, SEG)
    writer.open(first)
    data = os.urandom(SEG + SEG // 4)
    writer.put(first.start_lsn, memoryview(data)[:1000])
    assert writer.flush_here() == first.start_lsn + 1000
    writer.put(first.start_lsn + 1000, memoryview(data)[1000:])
    durable = writer.flush_here()
    try:
        # the close job is still blocked, yet the position in the next segment is durable ...
        assert durable == first.start_lsn + len(data)
        assert not closed
        # ... because the full segment's bytes are fsynced in its own .partial
        _, plain, valid_end = read_partial(writer.partial_path(first), keys, source="first segment")
        assert valid_end == SEG and bytes(plain[:SEG]) == data[:SEG]
        _, plain, valid_end = read_partial(
            writer.partial_path(first.next()), keys, source="next segment"
        )
        assert bytes(plain[:valid_end]) == data[SEG:]
    finally:
        gate.set()
        writer.close()
    assert [c.name for c in closed] == [first.name]
    assert writer.archive.read(first.name, keys) == data[:SEG]
    # the open segment's .partial stays; nothing else (no closed partial, no prepared temp file)
    assert leftovers(writer) == [f"{first.next().name}.partial"]


def test_commits_go_to_the_partial_with_direct_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = ring(tmp_path)
    writer = sync_writer(tmp_path, keys, [])
    seg = WalSegment.from_lsn(1, 5 * SEG, SEG)
    writer.open(seg)
    data = os.urandom(7 * 700)
    writer.put(seg.start_lsn, memoryview(data)[:700])
    writer.flush_here()  # the first sync publishes the file, on the general path
    direct: list[bool] = []
    real = os.pwritev

    def pwritev(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        direct.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "pwritev", pwritev)
    for pos in range(700, len(data), 700):
        writer.put(seg.start_lsn + pos, memoryview(data)[pos : pos + 700])
        assert writer.flush_here() == seg.start_lsn + pos + 700
    assert direct == [True] * 6  # one direct write per commit
    _, plain, valid_end = read_partial(writer.partial_path(seg), keys, source="p")
    assert valid_end == len(data) and bytes(plain) == data
    writer.close()


def test_recover_closes_a_complete_partial_and_keeps_an_incomplete_one(tmp_path: Path) -> None:
    keys = ring(tmp_path)
    closed: list[ClosedSegment] = []
    writer = sync_writer(tmp_path, keys, closed)
    full, short = WalSegment.from_lsn(1, 0, SEG), WalSegment.from_lsn(1, SEG, SEG)
    data = os.urandom(SEG)
    for seg, length in ((full, SEG), (short, SEG // 2)):
        with PartialWriter.create(
            writer.partial_path(seg), name=seg.name, codec=compression.get("none"), keyring=keys
        ) as partial:
            partial.append(0, data[:length])
    try:
        assert recover(writer, writer.partial_path(full), full)
        assert not recover(writer, writer.partial_path(short), short)
    finally:
        writer.close()
    assert writer.archive.read(full.name, keys) == data
    assert [c.name for c in closed] == [full.name]
    assert not writer.archive.segment_path(short.name).exists()
    assert leftovers(writer) == [f"{short.name}.partial"]


def test_an_unused_prepared_partial_leaves_no_file(tmp_path: Path) -> None:
    writer = sync_writer(tmp_path, ring(tmp_path), [])
    writer.open(WalSegment.from_lsn(1, 0, SEG))
    writer.close()
    assert leftovers(writer) == []


def test_append_sync_frames_read_back_exactly(tmp_path: Path) -> None:
    keys = ring(tmp_path)
    path = tmp_path / "seg.partial"
    data = os.urandom(300_000)
    with PartialWriter.create(
        path,
        name="000000010000000000000003",
        codec=compression.get("none"),
        keyring=keys,
        frame_size=64 * 1024,
        preallocate=128 * 1024,
    ) as partial:
        pos = 0
        for size in (100, 5000, 70_000, 30, 100_000, 124_870):  # small, split, past the zeros
            partial.append_sync(pos, memoryview(data)[pos : pos + size])
            pos += size
            _, plain, valid_end = read_partial(path, keys, source="p")
            assert valid_end == pos and bytes(plain[:pos]) == data[:pos]
    assert pos == len(data)
