"""WAL archive continuity across timelines (pure logic) and the check of every archived object."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from klio_common.errors import KlioError
from klio_common.pg.lsn import Lsn
from klio_common.pg.timeline import TimelineHistory
from klio_common.pg.walname import WalSegment, history_name

if TYPE_CHECKING:
    from klio_common.catalog.wal import WalArchive
    from klio_common.crypto import KeyRing


@dataclass(frozen=True)
class TimelineSpan:
    """A timeline on the path to the target timeline and the first segment read from it."""

    timeline: int
    begin_segno: int


@dataclass(frozen=True)
class Gap:
    """Consecutive segments that recovery would read from ``timeline`` and that are missing."""

    timeline: int
    first: WalSegment
    last: WalSegment

    @property
    def count(self) -> int:
        """How many segments are missing."""
        return self.last.segno - self.first.segno + 1

    @property
    def start_lsn(self) -> Lsn:
        """The first missing position."""
        return self.first.start_lsn

    @property
    def end_lsn(self) -> Lsn:
        """The first position after the missing range."""
        return self.last.end_lsn


@dataclass(frozen=True)
class Continuity:
    """What recovery to the end of the archive needs and what is missing.

    Attributes:
        target_timeline: the newest timeline known to the archive.
        path: the timelines recovery crosses, oldest first.
        first: the oldest archived segment on the path, None for an empty archive.
        last: the newest archived segment on the path.
        present: how many segments on the path between ``first`` and ``last`` are archived.
        gaps: the missing ranges, in order.
        missing_histories: timelines above 1 on the path or with archived segments whose history
            file is not archived.
        off_path: archived segments recovery to the target never reads (abandoned timelines,
            the old primary's WAL after a switch); informational.
    """

    target_timeline: int
    path: list[TimelineSpan]
    first: WalSegment | None
    last: WalSegment | None
    present: int
    gaps: list[Gap] = field(default_factory=list)
    missing_histories: list[int] = field(default_factory=list)
    off_path: list[WalSegment] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No gap and no missing history file."""
        return not self.gaps and not self.missing_histories


def timeline_path(
    target: int,
    histories: Mapping[int, TimelineHistory],
    seg_size: int,
    first_archived: Mapping[int, int],
) -> list[TimelineSpan]:
    """The timelines recovery to ``target`` crosses, oldest first, each with its first segment.

    A missing history file is bridged by a guess (the timeline starts at its oldest archived
    segment and descends from the next lower known timeline) so the rest can still be checked.

    Args:
        target: the target timeline.
        histories: parsed history files by timeline.
        seg_size: bytes per segment.
        first_archived: the oldest archived segment number of each timeline.

    Returns:
        The path; the last span is the target.
    """
    history = histories.get(target)
    if history is not None or target == 1:
        spans: list[TimelineSpan] = []
        begin = 0
        for entry in history.entries if history is not None else []:
            spans.append(TimelineSpan(entry.parent_tli, begin))
            begin = max(begin, entry.switch_lsn // seg_size)
        spans.append(TimelineSpan(target, begin))
        return spans
    known = set(histories) | set(first_archived) | {1}
    lower = [t for t in known if t < target]
    begin = first_archived.get(target, 0)
    if not lower:
        return [TimelineSpan(target, 0)]
    below = [s for s in timeline_path(max(lower), histories, seg_size, first_archived)]
    return [s for s in below if s.begin_segno <= begin] + [TimelineSpan(target, begin)]


def expected_timeline(path: list[TimelineSpan], segno: int) -> int:
    """The timeline recovery reads segment ``segno`` from: the newest whose first segment ≤ it."""
    for span in reversed(path):
        if span.begin_segno <= segno:
            return span.timeline
    return path[0].timeline


def check_continuity(
    segments: Iterable[WalSegment],
    histories: Mapping[int, TimelineHistory],
    seg_size: int,
    *,
    history_timelines: Iterable[int] | None = None,
) -> Continuity:
    """Find the gaps in an archive, from its oldest segment to its newest, across timelines.

    The rule is PostgreSQL's when it fetches segment N while recovering towards the target
    timeline (``XLogFileReadAnyTLI``): of the timelines in the target's history, it reads N from
    the newest one whose first segment is at or below N. That file, and no other, must exist.
    The target is the newest timeline the archive knows (recovery_target_timeline = latest).

    Args:
        segments: every archived complete segment (any order).
        histories: every archived history file that could be read, by timeline.
        seg_size: bytes per segment.
        history_timelines: timelines whose history file is archived, readable or not
            (default: the keys of ``histories``).

    Returns:
        The continuity report.
    """
    archived = {(s.timeline, s.segno) for s in segments}
    have_history = set(histories if history_timelines is None else history_timelines)
    first_archived: dict[int, int] = {}
    for tli, segno in archived:
        first_archived[tli] = min(segno, first_archived.get(tli, segno))
    target = max({1} | set(first_archived) | have_history | set(histories))
    path = timeline_path(target, histories, seg_size, first_archived)

    on_path = sorted(n for t, n in archived if expected_timeline(path, n) == t)
    off_path = sorted(
        WalSegment(t, n, seg_size) for t, n in archived if expected_timeline(path, n) != t
    )
    needs_history = {s.timeline for s in path} | set(first_archived)
    missing_histories = sorted(t for t in needs_history if t > 1 and t not in have_history)
    if not on_path:
        return Continuity(target, path, None, None, 0, [], missing_histories, off_path)

    gaps: list[Gap] = []
    open_gap: tuple[int, int, int] | None = None  # timeline, first segno, last segno
    for segno in range(on_path[0], on_path[-1] + 1):
        tli = expected_timeline(path, segno)
        if (tli, segno) in archived:
            continue
        if open_gap is not None and open_gap[0] == tli and open_gap[2] == segno - 1:
            open_gap = (tli, open_gap[1], segno)
            continue
        if open_gap is not None:
            gaps.append(_gap(open_gap, seg_size))
        open_gap = (tli, segno, segno)
    if open_gap is not None:
        gaps.append(_gap(open_gap, seg_size))

    first_segno, last_segno = on_path[0], on_path[-1]
    return Continuity(
        target_timeline=target,
        path=path,
        first=WalSegment(expected_timeline(path, first_segno), first_segno, seg_size),
        last=WalSegment(expected_timeline(path, last_segno), last_segno, seg_size),
        present=len(on_path),
        gaps=gaps,
        missing_histories=missing_histories,
        off_path=off_path,
    )


def _gap(span: tuple[int, int, int], seg_size: int) -> Gap:
    tli, first, last = span
    return Gap(tli, WalSegment(tli, first, seg_size), WalSegment(tli, last, seg_size))


@dataclass(frozen=True)
class Damaged:
    """An archived object that cannot be used, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class ArchiveReport:
    """The result of ``verify_archive``.

    Attributes:
        continuity: gaps and missing history files.
        damaged: objects that fail their checks (empty when decoding was skipped).
        decoded: how many objects were decoded and checked (0 with ``quick``).
        segments: archived complete segments.
        partials: archived closed ``.partial`` files.
        histories: archived history files.
    """

    continuity: Continuity
    damaged: list[Damaged]
    decoded: int
    segments: int
    partials: int
    histories: int

    @property
    def ok(self) -> bool:
        """Continuous and nothing damaged."""
        return self.continuity.ok and not self.damaged


def verify_archive(
    archive: WalArchive,
    keyring: KeyRing,
    *,
    quick: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ArchiveReport:
    """Check an archive's continuity and, unless ``quick``, decode and verify every object.

    History files are always decoded (recovery cannot follow a timeline switch without them).

    Args:
        archive: the Tier-1 WAL archive.
        keyring: the configured keys.
        quick: check names only, do not decode segments.
        workers: decoding threads (default: one per CPU, at most 4).
        progress: called with (done, total) after each decoded object.

    Returns:
        The report.

    Raises:
        NotFound: there is no archive.
    """
    seg_size = archive.segment_size()
    names = sorted(name for name, _ in archive.iter_segment_files())
    segments = [WalSegment.parse(n, seg_size) for n in names if not n.endswith(".partial")]
    timelines = archive.list_history()
    histories: dict[int, TimelineHistory] = {}
    damaged: list[Damaged] = []
    for tli in timelines:
        try:
            histories[tli] = archive.read_history(tli, keyring)
        except (KlioError, ValueError, UnicodeDecodeError) as exc:
            damaged.append(Damaged(history_name(tli), _reason(exc)))
    continuity = check_continuity(segments, histories, seg_size, history_timelines=timelines)

    decoded = len(timelines)
    if not quick:
        seg_checks = [(n, seg_size if not n.endswith(".partial") else None) for n in names]
        count = workers or min(4, os.cpu_count() or 2)
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="klio-verify") as pool:
            results = pool.map(lambda item: _check_object(archive, keyring, *item), seg_checks)
            for done, problem in enumerate(results, start=1):
                if problem is not None:
                    damaged.append(problem)
                if progress is not None:
                    progress(done, len(seg_checks))
        decoded += len(seg_checks)
    return ArchiveReport(
        continuity=continuity,
        damaged=damaged,
        decoded=decoded,
        segments=len(segments),
        partials=len(names) - len(segments),
        histories=len(timelines),
    )


def _check_object(
    archive: WalArchive, keyring: KeyRing, name: str, size: int | None
) -> Damaged | None:
    try:
        plaintext = archive.read(name, keyring)
    except (KlioError, OSError) as exc:
        return Damaged(name, _reason(exc))
    if size is not None and len(plaintext) != size:
        return Damaged(name, f"holds {len(plaintext)} bytes, a segment has {size}")
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KlioError):
        return exc.message
    if isinstance(exc, OSError):
        return f"cannot read: {exc.strerror or exc}"
    return str(exc)
