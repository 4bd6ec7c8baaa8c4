"""Tests of klio_common.pg.timeline."""

from __future__ import annotations

import pytest

from klio_common.pg import HistoryEntry, Lsn, TimelineHistory

# 00000004.history exactly as PostgreSQL 15 wrote it after three promotions.
PG15_TLI4 = (
    "1\t0/3000238\tno recovery target specified\n"
    "\n"
    "2\t0/50000C8\tno recovery target specified\n"
    "\n"
    "3\t0/70000C8\tno recovery target specified\n"
)


def test_parse_real_file() -> None:
    history = TimelineHistory.parse(4, PG15_TLI4)
    assert history.timeline == 4
    assert history.entries == (
        HistoryEntry(1, Lsn.parse("0/3000238"), "no recovery target specified"),
        HistoryEntry(2, Lsn.parse("0/50000C8"), "no recovery target specified"),
        HistoryEntry(3, Lsn.parse("0/70000C8"), "no recovery target specified"),
    )
    assert isinstance(history.entries[0].switch_lsn, Lsn)


def test_format_is_byte_identical_to_postgresql() -> None:
    assert TimelineHistory.parse(4, PG15_TLI4).format() == PG15_TLI4
    single = "1\t0/3000238\tno recovery target specified\n"
    assert TimelineHistory.parse(2, single).format() == single
    assert TimelineHistory(1).format() == ""


def test_parse_tolerates_comments_blank_lines_and_case() -> None:
    text = "# written by hand\n\n  1\t0/3000238\tbefore 2025-03-14 03:00:00+00\n\n\n2\t0/50000c8\n"
    history = TimelineHistory.parse(3, text)
    assert history.ancestors() == [1, 2]
    assert history.entries[0].reason == "before 2025-03-14 03:00:00+00"
    assert history.entries[1] == HistoryEntry(2, Lsn.parse("0/50000C8"), "")
    assert TimelineHistory.parse(3, history.format()) == history


def test_timelines_may_skip_ids() -> None:
    # Timeline 2 was a branch that lost; 4 descends from 1 then 3.
    history = TimelineHistory.parse(4, "1\t0/3000000\tx\n\n3\t0/9000000\ty\n")
    assert history.ancestors() == [1, 3]
    assert history.timelines() == [1, 3, 4]
    assert history.parent_of(4) == 3
    assert history.parent_of(3) == 1
    assert history.parent_of(1) is None
    with pytest.raises(ValueError, match="timeline 2 is not in the history of timeline 4"):
        history.parent_of(2)


def test_switch_points_and_begins() -> None:
    history = TimelineHistory.parse(4, PG15_TLI4)
    assert history.switch_point(1) == Lsn.parse("0/3000238")
    assert history.switch_point(3) == Lsn.parse("0/70000C8")
    assert history.switch_point(4) is None
    assert history.begin_lsn(1) == Lsn.INVALID
    assert history.begin_lsn(2) == Lsn.parse("0/3000238")
    assert history.begin_lsn(4) == Lsn.parse("0/70000C8")
    with pytest.raises(ValueError, match="not in the history"):
        history.switch_point(5)
    with pytest.raises(ValueError, match="not in the history"):
        history.begin_lsn(9)


def test_timeline_of_lsn_compares_numbers_not_text() -> None:
    # "0/A000000" sorts before "0/3000000" as text; as numbers it is after.
    history = TimelineHistory.parse(3, "1\t0/3000000\ta\n\n2\t0/A000000\tb\n")
    assert history.timeline_of_lsn(Lsn.parse("0/0")) == 1
    assert history.timeline_of_lsn(Lsn.parse("0/2FFFFFF")) == 1
    assert history.timeline_of_lsn(Lsn.parse("0/3000000")) == 2  # a switch point is the new one's
    assert history.timeline_of_lsn(Lsn.parse("0/9FFFFFF")) == 2
    assert history.timeline_of_lsn(Lsn.parse("0/A000000")) == 3
    assert history.timeline_of_lsn(Lsn.parse("10/0")) == 3
    assert TimelineHistory(1).timeline_of_lsn(Lsn.parse("5/0")) == 1


def test_root_timeline() -> None:
    history = TimelineHistory(1)
    assert history.ancestors() == []
    assert history.timelines() == [1]
    assert history.parent_of(1) is None
    assert history.switch_point(1) is None


@pytest.mark.parametrize(
    ("timeline", "text", "message"),
    [
        (3, "1\t0/3000000\n2\tzz/0\n", "invalid line 2"),
        (3, "one\t0/3000000\n", "invalid line 1"),
        (3, "1_0\t0/3000000\n", "invalid line 1"),
        (3, "1\n", "invalid line 1"),
        (3, "2\t0/3000000\n\n1\t0/5000000\n", "timeline ids must increase"),
        (3, "1\t0/5000000\n\n2\t0/3000000\n", "is before the previous one"),
        (2, "1\t0/3000000\n\n2\t0/5000000\n", "not older than the timeline itself"),
        (3, "0\t0/3000000\n", "invalid timeline 0"),
        (0, "", "invalid timeline 0"),
    ],
)
def test_parse_rejects(timeline: int, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TimelineHistory.parse(timeline, text)


def test_entries_validated_on_construction() -> None:
    with pytest.raises(ValueError, match="reason spans lines"):
        TimelineHistory(2, [HistoryEntry(1, Lsn(5), "a\nb")])
    built = TimelineHistory(2, [(1, 5, "r")])  # type: ignore[list-item]
    assert built.entries == (HistoryEntry(1, Lsn(5), "r"),)
    assert hash(built) == hash(TimelineHistory(2, [HistoryEntry(1, Lsn(5), "r")]))
    assert built != TimelineHistory(3, [HistoryEntry(1, Lsn(5), "r")])
    assert built != "x"
    assert "TimelineHistory(2" in repr(built)
