"""Tests of klio_common.pg.walname."""

from __future__ import annotations

import pytest

from klio_common.pg import (
    Lsn,
    WalSegment,
    history_name,
    is_history_name,
    is_partial_name,
    is_segment_name,
    parse_history_name,
    segments_between,
    validate_seg_size,
)

MIB = 1 << 20


@pytest.mark.parametrize(
    ("timeline", "lsn", "seg_size", "name"),
    [
        (1, "0/0", 16 * MIB, "000000010000000000000000"),
        (1, "0/3000028", 16 * MIB, "000000010000000000000003"),
        (2, "16/B374D848", 16 * MIB, "0000000200000016000000B3"),
        (1, "0/FFFFFFFF", 16 * MIB, "0000000100000000000000FF"),
        (1, "1/0", 16 * MIB, "000000010000000100000000"),
        (3, "16/B374D848", 1 * MIB, "000000030000001600000B37"),
        (1, "16/B374D848", 1024 * MIB, "000000010000001600000002"),
        (0xA, "FFFFFFFF/FFFFFFFF", 64 * MIB, "0000000AFFFFFFFF0000003F"),
    ],
)
def test_name_from_lsn(timeline: int, lsn: str, seg_size: int, name: str) -> None:
    segment = WalSegment.from_lsn(timeline, Lsn.parse(lsn), seg_size)
    assert segment.name == name
    assert str(segment) == name
    assert WalSegment.parse(name, seg_size) == segment
    assert segment.contains(Lsn.parse(lsn))


def test_lsn_bounds() -> None:
    segment = WalSegment.parse("0000000200000016000000B3")
    assert segment.seg_size == 16 * MIB
    assert segment.start_lsn == Lsn.parse("16/B3000000")
    assert segment.end_lsn == Lsn.parse("16/B4000000")
    assert isinstance(segment.start_lsn, Lsn)
    assert not segment.contains(segment.end_lsn)
    assert segment.contains(segment.end_lsn - 1)
    assert segment.next().name == "0000000200000016000000B4"
    assert segment.next().start_lsn == segment.end_lsn
    assert segment.prev().name == "0000000200000016000000B2"
    assert segment.on_timeline(3).name == "0000000300000016000000B3"
    assert segment.partial_name == "0000000200000016000000B3.partial"


def test_next_crosses_the_log_id() -> None:
    assert WalSegment.parse("0000000100000016000000FF").next().name == "000000010000001700000000"
    assert WalSegment.parse("000000010000001700000000").prev().name == "0000000100000016000000FF"
    with pytest.raises(ValueError, match="no predecessor"):
        WalSegment(1, 0).prev()


def test_parse_accepts_partial_suffix() -> None:
    assert WalSegment.parse("000000010000000000000003.partial").segno == 3


@pytest.mark.parametrize(
    "name",
    [
        "00000001000000000000003",  # 23 digits
        "0000000100000000000000033",
        "00000001000000000000000g",
        "00000001000000000000000a",  # PostgreSQL names are upper case
        "000000010000000000000100",  # low part out of range for 16 MiB segments
        "000000000000000000000001",  # timeline 0
        "00000001.history",
    ],
)
def test_parse_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="invalid WAL segment name"):
        WalSegment.parse(name)


@pytest.mark.parametrize("size", [0, MIB - 1, MIB + 1, 3 * MIB, 2048 * MIB, 512 * 1024, True, 1.0])
def test_seg_size_validated(size: int) -> None:
    with pytest.raises(ValueError, match="invalid WAL segment size"):
        validate_seg_size(size)
    with pytest.raises(ValueError, match="invalid WAL segment size"):
        WalSegment(1, 0, size)


@pytest.mark.parametrize("size", [1 << n for n in range(20, 31)])
def test_seg_sizes_accepted(size: int) -> None:
    assert validate_seg_size(size) == size
    first_of_next_id = WalSegment(1, 0x100000000 // size, size)
    assert first_of_next_id.name == "000000010000000100000000"


def test_fields_validated() -> None:
    with pytest.raises(ValueError, match="invalid timeline"):
        WalSegment(0, 1)
    with pytest.raises(ValueError, match="invalid timeline"):
        WalSegment(1 << 32, 1)
    with pytest.raises(ValueError, match="out of range"):
        WalSegment(1, -1)
    with pytest.raises(ValueError, match="out of range"):
        WalSegment(1, 1 << 40)  # past the end of a 64-bit LSN space with 16 MiB segments
    with pytest.raises(TypeError):
        WalSegment(1, "3")  # type: ignore[arg-type]


def test_ordering_is_segno_then_timeline() -> None:
    names = [
        "000000030000000000000002",
        "000000010000000000000003",
        "000000020000000000000002",
        "000000010000000000000001",
        "000000020000000100000000",
    ]
    ordered = sorted(WalSegment.parse(n) for n in names)
    assert [s.name for s in ordered] == [
        "000000010000000000000001",
        "000000020000000000000002",
        "000000030000000000000002",
        "000000010000000000000003",
        "000000020000000100000000",
    ]
    a, b = WalSegment(2, 5), WalSegment(1, 6)
    assert a < b and a <= b and b > a and b >= a and a <= a and a >= a
    assert not a < a
    assert a.sort_key == (5 * 16 * MIB, 2)
    assert WalSegment(1, 5) == WalSegment(1, 5)
    assert len({WalSegment(1, 5), WalSegment(1, 5), WalSegment(2, 5)}) == 2
    with pytest.raises(TypeError):
        assert a < "000000010000000000000003"  # type: ignore[operator]


def test_segments_between_is_half_open() -> None:
    seg = 16 * MIB
    names = [
        s.name for s in segments_between(2, Lsn.parse("0/2FFFFF0"), Lsn.parse("0/5000000"), seg)
    ]
    assert names == [
        "000000020000000000000002",
        "000000020000000000000003",
        "000000020000000000000004",
    ]
    one = list(segments_between(1, Lsn.parse("0/3000028"), Lsn.parse("0/3000100"), seg))
    assert [s.name for s in one] == ["000000010000000000000003"]
    past_boundary = segments_between(1, Lsn.parse("0/3000028"), Lsn.parse("0/4000001"))
    assert [s.segno for s in past_boundary] == [3, 4]
    assert list(segments_between(1, 100, 100)) == []
    across = list(segments_between(1, Lsn.parse("0/FF000000"), Lsn.parse("1/01000000")))
    assert [s.name for s in across] == ["0000000100000000000000FF", "000000010000000100000000"]
    with pytest.raises(ValueError, match="before it starts"):
        list(segments_between(1, 200, 100))


@pytest.mark.parametrize(
    ("name", "segment", "partial", "history"),
    [
        ("000000010000000000000003", True, False, False),
        ("000000010000000000000003.partial", False, True, False),
        ("00000002.history", False, False, True),
        ("0000000A.history", False, False, True),
        ("0000000a.history", False, False, False),
        ("000000010000000000000003.backup", False, False, False),
        ("00000001000000000000000a", False, False, False),
        ("000000010000000000000003 ", False, False, False),
        ("x000000010000000000000003", False, False, False),
        ("00000002.history.partial", False, False, False),
        ("", False, False, False),
    ],
)
def test_name_predicates(name: str, segment: bool, partial: bool, history: bool) -> None:
    assert is_segment_name(name) is segment
    assert is_partial_name(name) is partial
    assert is_history_name(name) is history


def test_history_names() -> None:
    assert history_name(2) == "00000002.history"
    assert history_name(0x1F) == "0000001F.history"
    assert parse_history_name("0000001F.history") == 0x1F
    for bad in ("00000000.history", "2.history", "00000002.History", "000000020000000000000003"):
        with pytest.raises(ValueError, match="invalid history file name"):
            parse_history_name(bad)
    with pytest.raises(ValueError, match="invalid timeline"):
        history_name(0)


def test_last_segment_of_the_lsn_space() -> None:
    last = WalSegment.from_lsn(1, Lsn.parse("FFFFFFFF/FFFFFFFF"))
    assert last.name == "00000001FFFFFFFF000000FF"
    assert last.contains(Lsn.parse("FFFFFFFF/FFFFFFFF"))
    with pytest.raises(ValueError, match="out of range"):
        last.next()
    with pytest.raises(ValueError, match="out of range"):
        _ = last.end_lsn
