"""The SegmentWriter's worker: a failed job stops the jobs queued behind it."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.pg.walname import WalSegment
from klio_wal_receiver.announcer import ClosedSegment
from klio_wal_receiver.segments import SegmentWriter
from tests.unit.test_objects import ring

SEG = 1 << 20  # the smallest wal_segment_size


def test_a_failed_close_leaves_the_next_segment_unwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = ring(tmp_path)
    closed: list[ClosedSegment] = []
    archive = WalArchive(tmp_path / "tier1", "c1")
    writer = SegmentWriter(archive, keys, compression.get("zstd", 1), SEG, closed.append)

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(archive, "store_segment", full)
    first = WalSegment.from_lsn(1, 5 * SEG, SEG)
    data = os.urandom(SEG + SEG // 4)

    async def stream() -> None:
        writer.open(first)
        await writer.write(first.start_lsn, memoryview(data))  # queues the close of `first`
        await writer.flush()  # appends to the next segment's .partial, behind the close

    try:
        with pytest.raises(OSError) as err:
            asyncio.run(stream())
        assert err.value.errno == errno.ENOSPC  # the close's error
    finally:
        writer.close()  # waits for the jobs queued behind the close
    # Nothing beyond the segment the archive does not hold became durable.
    assert writer.durable < first.end_lsn
    assert not writer.partial_path(first.next()).exists()
    assert closed == []
