"""Tests of klio_common.events.subjects."""

from __future__ import annotations

import re

import pytest

from klio_common.events import ALL_EVENTS, BackupDone, DeadLetter, WalSegmentClosed
from klio_common.events.base import Event
from klio_common.events.schema import examples
from klio_common.events.subjects import (
    STREAM,
    STREAM_SUBJECTS,
    all_clusters,
    cluster_of,
    cluster_subjects,
    durable,
    event_type_of,
    subject,
    subject_of,
    validate_cluster_name,
)


def test_stream() -> None:
    assert STREAM == "KLIO"
    assert STREAM_SUBJECTS == ["klio.>"]


def test_subject_from_type_tag_or_event() -> None:
    assert subject("main", WalSegmentClosed) == "klio.main.wal.segment.closed"
    assert subject("main", "backup.done") == "klio.main.backup.done"
    done = next(e for e in examples() if isinstance(e, BackupDone))
    assert subject("other", done) == "klio.other.backup.done"
    assert subject_of(done) == f"klio.{done.cluster}.backup.done"
    assert subject("pg-1", DeadLetter) == "klio.pg-1.deadletter"


def test_every_event_has_a_distinct_valid_subject() -> None:
    subjects = {subject("main", cls) for cls in ALL_EVENTS}
    assert len(subjects) == len(ALL_EVENTS)
    for value in subjects:
        assert re.fullmatch(r"klio\.main\.[a-z0-9]+(\.[a-z0-9]+)*", value)


def test_filters() -> None:
    assert all_clusters(WalSegmentClosed) == "klio.*.wal.segment.closed"
    assert all_clusters("backup.requested") == "klio.*.backup.requested"
    assert cluster_subjects("main") == "klio.main.>"


def test_cluster_and_type_of_subject() -> None:
    assert cluster_of("klio.main.wal.segment.closed") == "main"
    assert event_type_of("klio.main.wal.segment.closed") == "wal.segment.closed"
    assert cluster_of(subject("db-2", "deadletter")) == "db-2"
    for bad in ("klio.main", "other.main.backup.done", "klio..backup.done", "klio.Main.x", ""):
        with pytest.raises(ValueError, match="not a Klio subject"):
            cluster_of(bad)


def test_durable_names_have_no_dots() -> None:
    assert durable("relay", "wal.segment.closed") == "relay--wal-segment-closed"
    assert durable("retention", BackupDone) == "retention--backup-done"
    names = {durable("relay", cls) for cls in ALL_EVENTS}
    assert len(names) == len(ALL_EVENTS)
    for name in names:
        assert re.fullmatch(r"[a-z0-9-]+", name)
    for bad in ("Relay", "re.lay", "", "-relay", "relay service"):
        with pytest.raises(ValueError, match="invalid service name"):
            durable(bad, BackupDone)


@pytest.mark.parametrize("name", ["main", "a", "pg-main-01", "0", "a" * 63, "9lives"])
def test_valid_cluster_names(name: str) -> None:
    assert validate_cluster_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Main", "-main", "main-", "ma_in", "ma.in", "a" * 64, "main ", "mäin"]
)
def test_invalid_cluster_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid cluster name"):
        validate_cluster_name(name)
    with pytest.raises(ValueError, match="invalid cluster name"):
        subject(name, BackupDone)


def test_invalid_event_types() -> None:
    with pytest.raises(ValueError, match="invalid event type"):
        subject("main", "wal.>")
    with pytest.raises(ValueError, match="invalid event type"):
        all_clusters("")
    with pytest.raises(ValueError, match="not a concrete event type"):
        subject("main", Event)
