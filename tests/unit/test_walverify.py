"""Continuity of a WAL archive across timelines (klio_restore.walverify, pure logic)."""

from __future__ import annotations

from klio_common.pg.lsn import Lsn
from klio_common.pg.timeline import HistoryEntry, TimelineHistory
from klio_common.pg.walname import WalSegment
from klio_restore.walverify import (
    TimelineSpan,
    check_continuity,
    expected_timeline,
    timeline_path,
)

SEG = 16 << 20


def segs(tli: int, *segnos: int) -> list[WalSegment]:
    return [WalSegment(tli, n, SEG) for n in segnos]


def history(tli: int, *entries: tuple[int, str]) -> TimelineHistory:
    return TimelineHistory(tli, [HistoryEntry(p, Lsn.parse(lsn), "r") for p, lsn in entries])


def test_single_timeline_without_gaps() -> None:
    report = check_continuity(segs(1, 3, 4, 5, 6), {}, SEG)
    assert report.ok
    assert report.target_timeline == 1
    assert report.first == WalSegment(1, 3, SEG)
    assert report.last == WalSegment(1, 6, SEG)
    assert report.present == 4
    assert report.gaps == []
    assert report.off_path == []


def test_empty_archive_has_no_range_and_no_problem() -> None:
    report = check_continuity([], {}, SEG)
    assert report.ok
    assert report.first is None and report.last is None
    assert report.present == 0


def test_gaps_are_merged_ranges_with_names_and_lsns() -> None:
    report = check_continuity(segs(1, 1, 2, 5, 6, 8), {}, SEG)
    assert not report.ok
    assert [(g.first.name, g.last.name, g.count) for g in report.gaps] == [
        ("000000010000000000000003", "000000010000000000000004", 2),
        ("000000010000000000000007", "000000010000000000000007", 1),
    ]
    first = report.gaps[0]
    assert str(first.start_lsn) == "0/3000000"
    assert str(first.end_lsn) == "0/5000000"


def test_gap_across_a_log_id_boundary_uses_segment_names() -> None:
    # With 16 MiB segments, segment 0xFF is the last of log id 0; 0x100 is 000000010000000100000000.
    report = check_continuity(segs(1, 0xFE, 0x101), {}, SEG)
    assert [(g.first.name, g.last.name) for g in report.gaps] == [
        ("0000000100000000000000FF", "000000010000000100000000"),
    ]


def test_switch_segment_must_come_from_the_new_timeline() -> None:
    # Timeline 2 starts inside segment 5: recovery reads 5 onwards from timeline 2.
    hist = {2: history(2, (1, "0/5000100"))}
    report = check_continuity([*segs(1, 3, 4, 5), *segs(2, 5, 6, 7)], hist, SEG)
    assert report.ok, report
    assert report.target_timeline == 2
    assert report.path == [TimelineSpan(1, 0), TimelineSpan(2, 5)]
    assert report.first == WalSegment(1, 3, SEG)
    assert report.last == WalSegment(2, 7, SEG)
    # Timeline 1's copy of segment 5 (it ends past the switch point) is never read.
    assert report.off_path == [WalSegment(1, 5, SEG)]


def test_missing_switch_segment_on_new_timeline_is_a_gap() -> None:
    hist = {2: history(2, (1, "0/5000100"))}
    report = check_continuity([*segs(1, 3, 4, 5), *segs(2, 6, 7)], hist, SEG)
    assert [(g.timeline, g.first.name, g.last.name) for g in report.gaps] == [
        (2, "000000020000000000000005", "000000020000000000000005"),
    ]


def test_switch_on_a_segment_boundary() -> None:
    # The switch point is the first byte of segment 6: segment 5 comes from timeline 1.
    hist = {2: history(2, (1, "0/6000000"))}
    report = check_continuity([*segs(1, 4, 5), *segs(2, 6, 7)], hist, SEG)
    assert report.ok, report
    assert expected_timeline(report.path, 5) == 1
    assert expected_timeline(report.path, 6) == 2


def test_segment_missing_on_the_old_timeline_before_the_switch() -> None:
    hist = {2: history(2, (1, "0/7000000"))}
    report = check_continuity([*segs(1, 3, 4, 6), *segs(2, 7, 8)], hist, SEG)
    assert [(g.timeline, g.first.segno) for g in report.gaps] == [(1, 5)]


def test_three_timelines_and_an_abandoned_branch() -> None:
    hist = {
        2: history(2, (1, "0/4000080")),
        3: history(3, (1, "0/4000080"), (2, "0/6800000")),
        4: history(4, (1, "0/3000000")),
    }
    # Timeline 4 branched from 1 earlier and was abandoned... but it is the newest id, so it is
    # the target: its path is 1 then 4 from segment 3.
    archived = [*segs(1, 1, 2, 3, 4), *segs(2, 4, 5, 6), *segs(3, 6, 7), *segs(4, 3, 4)]
    report = check_continuity(archived, hist, SEG)
    assert report.target_timeline == 4
    assert report.path == [TimelineSpan(1, 0), TimelineSpan(4, 3)]
    assert report.last == WalSegment(4, 4, SEG)
    assert report.ok
    assert {(s.timeline, s.segno) for s in report.off_path} == {
        (1, 3),
        (1, 4),
        (2, 4),
        (2, 5),
        (2, 6),
        (3, 6),
        (3, 7),
    }


def test_path_through_three_timelines() -> None:
    hist = {
        2: history(2, (1, "0/4000080")),
        3: history(3, (1, "0/4000080"), (2, "0/6800000")),
    }
    archived = [*segs(1, 1, 2, 3), *segs(2, 4, 5), *segs(3, 6, 7, 9)]
    report = check_continuity(archived, hist, SEG)
    assert report.path == [TimelineSpan(1, 0), TimelineSpan(2, 4), TimelineSpan(3, 6)]
    assert [(g.timeline, g.first.segno, g.last.segno) for g in report.gaps] == [(3, 8, 8)]
    assert report.missing_histories == []


def test_missing_history_file_is_reported_and_bridged() -> None:
    # No 00000002.history: timeline 2 is assumed to start at its oldest archived segment.
    report = check_continuity([*segs(1, 1, 2, 3), *segs(2, 4, 5)], {}, SEG)
    assert report.missing_histories == [2]
    assert report.gaps == []
    assert not report.ok
    assert report.path == [TimelineSpan(1, 0), TimelineSpan(2, 4)]


def test_history_archived_but_unreadable_is_not_reported_missing() -> None:
    report = check_continuity([*segs(1, 1, 2), *segs(2, 3)], {}, SEG, history_timelines=[2])
    assert report.missing_histories == []


def test_history_without_segments_makes_the_newest_timeline_the_target() -> None:
    # Promotion archived 00000003.history; no segment of timeline 3 is closed yet.
    hist = {
        2: history(2, (1, "0/2000000")),
        3: history(3, (1, "0/2000000"), (2, "0/5000000")),
    }
    report = check_continuity([*segs(1, 1), *segs(2, 2, 3, 4)], hist, SEG)
    assert report.target_timeline == 3
    assert report.ok
    assert report.last == WalSegment(2, 4, SEG)


def test_old_primary_wal_after_the_switch_does_not_extend_the_range() -> None:
    hist = {2: history(2, (1, "0/5000000"))}
    report = check_continuity([*segs(1, 3, 4, 5, 6, 7, 8), *segs(2, 5, 6)], hist, SEG)
    assert report.last == WalSegment(2, 6, SEG)
    assert report.ok


def test_timeline_path_of_timeline_one_is_itself() -> None:
    assert timeline_path(1, {}, SEG, {}) == [TimelineSpan(1, 0)]


def test_gap_in_a_1mib_segment_archive() -> None:
    size = 1 << 20
    report = check_continuity([WalSegment(1, 0x1FF, size), WalSegment(1, 0x1000, size)], {}, size)
    assert len(report.gaps) == 1
    gap = report.gaps[0]
    assert gap.first.segno == 0x200 and gap.last.segno == 0xFFF
    assert str(gap.start_lsn) == "0/20000000"
    assert str(gap.end_lsn) == "1/0"
