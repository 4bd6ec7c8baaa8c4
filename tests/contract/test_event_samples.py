"""The wire contract: golden samples round-trip byte for byte and decode strictly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import msgspec
import pytest

from klio_common.errors import Permanent
from klio_common.events import (
    ALL_EVENTS,
    BackupDone,
    BackupStarted,
    DeadLetter,
    Event,
    WalSegmentClosed,
    now,
    tag_of,
)
from klio_common.events.codec import (
    decode,
    decode_strict,
    encode,
    event_id_for,
    new_event_id,
    strict_type,
    validate,
)

SAMPLES = Path(__file__).parent / "samples"
SAMPLE_FILES = sorted(SAMPLES.glob("*.json"))


def canonical(data: bytes) -> bytes:
    return msgspec.json.format(data, indent=2) + b"\n"


def test_every_event_type_has_a_golden_sample() -> None:
    stems = {path.stem for path in SAMPLE_FILES}
    assert {tag_of(cls) for cls in ALL_EVENTS} <= stems


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_sample_round_trips_byte_for_byte(path: Path) -> None:
    sample = path.read_bytes()
    event = decode(sample)
    assert canonical(encode(event)) == sample
    assert path.stem.split("--")[0] == tag_of(event)


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_sample_decodes_strictly(path: Path) -> None:
    sample = path.read_bytes()
    event = decode_strict(sample)
    assert event == decode(sample)
    assert decode_strict(sample, type(event)) == event
    assert type(event) in ALL_EVENTS


def test_all_events_have_unique_tags_and_the_envelope() -> None:
    tags = [tag_of(cls) for cls in ALL_EVENTS]
    assert len(set(tags)) == len(tags)
    envelope = ["schema", "event_id", "occurred_at", "cluster", "system_id"]
    for cls in ALL_EVENTS:
        assert issubclass(cls, Event)
        assert cls.__struct_config__.frozen
        assert cls.__struct_config__.tag_field == "type"
        names = [f.name for f in msgspec.structs.fields(cls)]
        assert names[-5:] == envelope


def _sample(tag: str) -> dict[str, object]:
    data = msgspec.json.decode((SAMPLES / f"{tag}.json").read_bytes())
    assert isinstance(data, dict)
    return data


def test_lenient_decode_ignores_unknown_fields_and_strict_refuses_them() -> None:
    data = _sample("wal.segment.closed") | {"added_in_a_later_release": [1, 2]}
    raw = msgspec.json.encode(data)
    event = decode(raw)
    assert isinstance(event, WalSegmentClosed)
    assert "added_in_a_later_release" not in encode(event).decode()
    with pytest.raises(Permanent, match="unknown field `added_in_a_later_release`"):
        decode_strict(raw)
    with pytest.raises(Permanent, match="unknown field"):
        decode_strict(raw, WalSegmentClosed)


def test_strict_mirror_matches_the_event() -> None:
    mirror = strict_type(BackupDone)
    assert mirror.__struct_config__.forbid_unknown_fields
    assert mirror.__struct_config__.tag == "backup.done"
    assert [f.name for f in msgspec.structs.fields(mirror)] == [
        f.name for f in msgspec.structs.fields(BackupDone)
    ]


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"sha256": None}, "Expected `str`, got `null`"),
        ({"sha256": "ABC"}, "matching regex"),
        ({"segment": "000000010000000000000003.partial"}, "end in '.partial' exactly when"),
        ({"segment": "00000001000000000000000a"}, "matching regex"),
        ({"timeline": 0}, ">= 1"),
        ({"size": -1}, ">= 0"),
        ({"start_lsn": "0/3/0"}, "matching regex"),
        ({"occurred_at": "2025-03-14T03:00:07"}, "timezone"),
        ({"system_id": 7412345678901234567}, "Expected `str`"),
        ({"cluster": "Main"}, "matching regex"),
        ({"type": "wal.segment.opened"}, "Invalid value 'wal.segment.opened'"),
    ],
)
def test_schema_violations_are_permanent(change: dict[str, object], complaint: str) -> None:
    raw = msgspec.json.encode(_sample("wal.segment.closed") | change)
    with pytest.raises(Permanent, match=complaint) as info:
        decode(raw, subject="klio.main.wal.segment.closed")
    assert info.value.message.startswith("malformed event on klio.main.wal.segment.closed: ")
    assert info.value.hint


def test_missing_field_is_permanent() -> None:
    data = _sample("backup.done")
    del data["end_lsn"]
    with pytest.raises(Permanent, match="missing required field `end_lsn`"):
        decode(msgspec.json.encode(data))


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'"x"', b"\xff\xfe", b"{}"])
def test_garbage_is_permanent(raw: bytes) -> None:
    with pytest.raises(Permanent, match=r"^malformed event: "):
        decode(raw)


def test_decode_one_type_refuses_another() -> None:
    raw = (SAMPLES / "backup.done.json").read_bytes()
    assert isinstance(decode(raw, BackupDone), BackupDone)
    with pytest.raises(Permanent, match="malformed event"):
        decode(raw, BackupStarted)


def test_defaults_and_optional_fields() -> None:
    data = _sample("wal.segment.closed")
    del data["partial"]
    del data["schema"]
    event = decode(msgspec.json.encode(data), WalSegmentClosed)
    assert event.partial is False
    assert event.schema == 1
    assert b'"partial":false' in encode(event)
    assert b'"schema":1' in encode(event)


def test_events_are_frozen() -> None:
    event = decode((SAMPLES / "deadletter.json").read_bytes(), DeadLetter)
    with pytest.raises(AttributeError):
        event.reason = "x"  # type: ignore[misc]


def test_system_id_keeps_uint64_precision() -> None:
    data = _sample("backup.done")
    data["system_id"] = str((1 << 64) - 1)
    event = decode(msgspec.json.encode(data))
    assert int(event.system_id) == (1 << 64) - 1


def test_times_are_utc_and_keep_their_offset() -> None:
    assert now().tzinfo is UTC
    data = _sample("backup.done") | {"end_time": "2025-03-14T05:04:51+02:00"}
    event = decode(msgspec.json.encode(data), BackupDone)
    assert event.end_time == datetime(2025, 3, 14, 3, 4, 51, tzinfo=UTC)
    assert event.end_time.utcoffset() == timezone(timedelta(hours=2)).utcoffset(None)


def test_event_ids_are_deterministic() -> None:
    first = event_id_for("wal.segment.closed", "main", "000000010000000000000003", "ab")
    again = event_id_for("wal.segment.closed", "main", "000000010000000000000003", "ab")
    assert first == again
    assert len(first) == 32 and all(c in "0123456789abcdef" for c in first)
    assert event_id_for("a.b", "c") != event_id_for("a", "b.c")
    assert event_id_for("a", "bc") != event_id_for("ab", "c")
    assert event_id_for("x") != event_id_for("y")
    with pytest.raises(ValueError, match="at least one part"):
        event_id_for()
    assert new_event_id() != new_event_id()
    assert len(new_event_id()) == 32


def test_validate_catches_publisher_bugs() -> None:
    event = decode((SAMPLES / "backup.done.json").read_bytes(), BackupDone)
    validate(event)
    for change in ({"system_id": ""}, {"start_lsn": "0/0/0"}, {"size": -5}):
        bad = msgspec.structs.replace(event, **change)
        with pytest.raises(Permanent, match=r"^malformed event backup.done \(invalid to publish\)"):
            validate(bad)
