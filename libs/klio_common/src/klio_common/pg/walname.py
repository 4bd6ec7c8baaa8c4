"""WAL file names: segments, ``.partial`` segments and timeline history files."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from klio_common.pg.lsn import Lsn

MIN_SEG_SIZE = 1 << 20
MAX_SEG_SIZE = 1 << 30
DEFAULT_SEG_SIZE = 16 << 20
MAX_TIMELINE = 0xFFFFFFFF

# PostgreSQL writes and recognises WAL file names in upper-case hex only (IsXLogFileName).
_SEGMENT_RE = re.compile(r"[0-9A-F]{24}")
_PARTIAL_RE = re.compile(r"[0-9A-F]{24}\.partial")
_HISTORY_RE = re.compile(r"[0-9A-F]{8}\.history")


def validate_seg_size(seg_size: int) -> int:
    """Check a WAL segment size the way initdb's ``--wal-segsize`` does.

    Args:
        seg_size: bytes per segment.

    Returns:
        ``seg_size`` unchanged.

    Raises:
        ValueError: not a power of two between 1 MiB and 1 GiB.
    """
    if (
        isinstance(seg_size, bool)
        or not isinstance(seg_size, int)
        or not MIN_SEG_SIZE <= seg_size <= MAX_SEG_SIZE
        or seg_size & (seg_size - 1)
    ):
        raise ValueError(
            f"invalid WAL segment size {seg_size!r}: expected a power of two from 1 MiB to 1 GiB"
        )
    return seg_size


def _check_timeline(timeline: int) -> int:
    if isinstance(timeline, bool) or not isinstance(timeline, int):
        raise TypeError(f"a timeline is an int, not {type(timeline).__name__}")
    if not 1 <= timeline <= MAX_TIMELINE:
        raise ValueError(f"invalid timeline {timeline}: expected 1 to {MAX_TIMELINE}")
    return timeline


def _segs_per_xlogid(seg_size: int) -> int:
    return 0x100000000 // seg_size


@dataclass(frozen=True)
class WalSegment:
    """One WAL segment: a timeline and a segment number, for a given segment size.

    Segments order by ``sort_key`` (segment number, then timeline): the order in which
    PostgreSQL replays them, where a higher timeline replaces a lower one at the same place.

    Attributes:
        timeline: the timeline id (1 or more).
        segno: the segment number, ``start_lsn // seg_size``.
        seg_size: bytes per segment (the server's ``wal_segment_size``).
    """

    timeline: int
    segno: int
    seg_size: int = DEFAULT_SEG_SIZE

    def __post_init__(self) -> None:
        _check_timeline(self.timeline)
        validate_seg_size(self.seg_size)
        if isinstance(self.segno, bool) or not isinstance(self.segno, int):
            raise TypeError(f"a segment number is an int, not {type(self.segno).__name__}")
        if not 0 <= self.segno < (1 << 64) // self.seg_size:
            raise ValueError(f"segment number {self.segno} is out of range")

    @classmethod
    def parse(cls, name: str, seg_size: int = DEFAULT_SEG_SIZE) -> WalSegment:
        """Parse a segment name such as ``000000010000000000000003``.

        A ``.partial`` suffix is accepted and dropped (the segment is the same).

        Args:
            name: 24 upper-case hex digits, optionally followed by ``.partial``.
            seg_size: bytes per segment; the name alone does not say.

        Returns:
            The segment.

        Raises:
            ValueError: not a segment name, or impossible for this segment size.
        """
        validate_seg_size(seg_size)
        base = name.removesuffix(".partial")
        if not _SEGMENT_RE.fullmatch(base):
            raise ValueError(
                f"invalid WAL segment name {name!r}: expected 24 upper-case hex digits"
            )
        timeline, high, low = int(base[:8], 16), int(base[8:16], 16), int(base[16:], 16)
        per_id = _segs_per_xlogid(seg_size)
        if low >= per_id:
            raise ValueError(
                f"invalid WAL segment name {name!r} for {seg_size} byte segments: "
                f"the last 8 digits must be below {per_id:08X}"
            )
        if timeline == 0:
            raise ValueError(f"invalid WAL segment name {name!r}: timeline 0 does not exist")
        return cls(timeline, high * per_id + low, seg_size)

    @classmethod
    def from_lsn(cls, timeline: int, lsn: int, seg_size: int = DEFAULT_SEG_SIZE) -> WalSegment:
        """The segment of ``timeline`` that holds the byte at ``lsn``.

        Args:
            timeline: the timeline id.
            lsn: any position (an ``Lsn`` or an int).
            seg_size: bytes per segment.

        Returns:
            The segment.
        """
        validate_seg_size(seg_size)
        return cls(timeline, Lsn(lsn) // seg_size, seg_size)

    @property
    def name(self) -> str:
        """The file name, e.g. ``000000010000000000000003``."""
        per_id = _segs_per_xlogid(self.seg_size)
        return f"{self.timeline:08X}{self.segno // per_id:08X}{self.segno % per_id:08X}"

    @property
    def partial_name(self) -> str:
        """The file name of this segment while incomplete, ``<name>.partial``."""
        return f"{self.name}.partial"

    @property
    def start_lsn(self) -> Lsn:
        """The first position in this segment."""
        return Lsn(self.segno * self.seg_size)

    @property
    def end_lsn(self) -> Lsn:
        """The first position after this segment (the start of the next one).

        Raises:
            ValueError: the very last segment of the 64-bit LSN space has no end position.
        """
        return Lsn((self.segno + 1) * self.seg_size)

    @property
    def sort_key(self) -> tuple[int, int]:
        """``(start_lsn, timeline)``: the same order as (segno, timeline) for one segment size."""
        return (self.start_lsn, self.timeline)

    def contains(self, lsn: int) -> bool:
        """Whether the byte at ``lsn`` lies in this segment."""
        return Lsn(lsn) // self.seg_size == self.segno

    def next(self) -> WalSegment:
        """The following segment on the same timeline."""
        return WalSegment(self.timeline, self.segno + 1, self.seg_size)

    def prev(self) -> WalSegment:
        """The preceding segment on the same timeline.

        Raises:
            ValueError: this is segment 0.
        """
        if self.segno == 0:
            raise ValueError("segment 0 has no predecessor")
        return WalSegment(self.timeline, self.segno - 1, self.seg_size)

    def on_timeline(self, timeline: int) -> WalSegment:
        """The segment at the same place on another timeline."""
        return WalSegment(timeline, self.segno, self.seg_size)

    def __lt__(self, other: WalSegment) -> bool:
        if not isinstance(other, WalSegment):
            return NotImplemented
        return self.sort_key < other.sort_key

    def __le__(self, other: WalSegment) -> bool:
        if not isinstance(other, WalSegment):
            return NotImplemented
        return self.sort_key <= other.sort_key

    def __gt__(self, other: WalSegment) -> bool:
        if not isinstance(other, WalSegment):
            return NotImplemented
        return self.sort_key > other.sort_key

    def __ge__(self, other: WalSegment) -> bool:
        if not isinstance(other, WalSegment):
            return NotImplemented
        return self.sort_key >= other.sort_key

    def __str__(self) -> str:
        return self.name


def segments_between(
    timeline: int, start_lsn: int, end_lsn: int, seg_size: int = DEFAULT_SEG_SIZE
) -> Iterator[WalSegment]:
    """The segments of ``timeline`` holding the bytes from ``start_lsn`` up to ``end_lsn``.

    The range is half-open, ``[start_lsn, end_lsn)``: a range that ends exactly on a segment
    boundary does not include the segment starting there. PostgreSQL computes the last WAL
    file a backup needs the same way (``XLByteToPrevSeg`` of the stop LSN).

    Args:
        timeline: the timeline id.
        start_lsn: the first byte.
        end_lsn: the position after the last byte; equal to ``start_lsn`` for no segments.
        seg_size: bytes per segment.

    Yields:
        Each segment, in order.

    Raises:
        ValueError: ``end_lsn`` is before ``start_lsn``.
    """
    start, end = Lsn(start_lsn), Lsn(end_lsn)
    if end < start:
        raise ValueError(f"WAL range ends at {end} before it starts at {start}")
    if end == start:
        return
    segment = WalSegment.from_lsn(timeline, start, seg_size)
    last = WalSegment.from_lsn(timeline, end - 1, seg_size)
    while True:
        yield segment
        if segment.segno == last.segno:
            return
        segment = segment.next()


def is_segment_name(name: str) -> bool:
    """Whether ``name`` is a complete segment's file name (24 upper-case hex digits)."""
    return _SEGMENT_RE.fullmatch(name) is not None


def is_partial_name(name: str) -> bool:
    """Whether ``name`` is a partial segment's file name (``<24 hex digits>.partial``)."""
    return _PARTIAL_RE.fullmatch(name) is not None


def is_history_name(name: str) -> bool:
    """Whether ``name`` is a timeline history file name (``<8 hex digits>.history``)."""
    return _HISTORY_RE.fullmatch(name) is not None


def history_name(timeline: int) -> str:
    """The history file name of ``timeline``, e.g. ``00000002.history``."""
    return f"{_check_timeline(timeline):08X}.history"


def parse_history_name(name: str) -> int:
    """The timeline of a history file name.

    Args:
        name: e.g. ``00000002.history``.

    Returns:
        The timeline id.

    Raises:
        ValueError: not a history file name.
    """
    if not is_history_name(name):
        raise ValueError(
            f"invalid history file name {name!r}: expected 8 upper-case hex digits + '.history'"
        )
    timeline = int(name[:8], 16)
    if timeline == 0:
        raise ValueError(f"invalid history file name {name!r}: timeline 0 does not exist")
    return timeline
