"""The Tier-2 journal: append and fsync per batch, load, survive a torn line, rebuild."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from klio_common.errors import Retryable
from klio_common.storage.tier2state import (
    JOURNAL,
    TOMBSTONES,
    UNKNOWN_SHA256,
    Tier2Entry,
    Tier2State,
)

A = Tier2Entry("wal/0000000100000000/000000010000000000000001", "a" * 64, 100)
B = Tier2Entry("chunks/ab/" + "ab" + "cd" * 31, "b" * 64, 200)
C = Tier2Entry("identity.json", UNKNOWN_SHA256, 50)


def test_recorded_entries_survive_a_restart(tmp_path: Path) -> None:
    state = Tier2State(tmp_path, file_mode=0o640, dir_mode=0o750)
    assert not state.exists and state.load() == 0
    state.record([A, B])
    state.record([])
    assert A.path in state and state.get(B.path) == B and len(state) == 2
    assert (tmp_path / JOURNAL).stat().st_mode & 0o777 == 0o640
    again = Tier2State(tmp_path)
    assert again.exists and again.load() == 2
    assert set(again) == {A, B}


def test_a_torn_last_line_is_ignored_and_not_merged_with_the_next(tmp_path: Path) -> None:
    state = Tier2State(tmp_path)
    state.record([A])
    with (tmp_path / JOURNAL).open("ab") as f:
        f.write(B.line()[:20])  # a crash in the middle of an append
    again = Tier2State(tmp_path)
    assert again.load() == 1
    again.record([C])
    third = Tier2State(tmp_path)
    assert third.load() == 2
    assert set(third) == {A, C}


def test_an_append_cut_short_by_a_full_volume_is_not_merged_with_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = Tier2State(tmp_path)
    state.record([A])
    real = os.write

    def full(fd: int, data: bytes) -> int:  # what fits, then nothing
        monkeypatch.setattr(os, "write", lambda fd, data: _enospc())
        return real(fd, memoryview(data)[:20])

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(Retryable, match=r"no space left on device writing .*journal") as err:
        state.record([B])
    assert err.value.hint and "grow it" in err.value.hint
    monkeypatch.setattr(os, "write", real)
    state.record([C])  # room again: the same process goes on
    again = Tier2State(tmp_path)
    assert again.load() == 2
    assert set(again) == {A, C}


def _enospc() -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_rebuild_replaces_the_journal(tmp_path: Path) -> None:
    state = Tier2State(tmp_path)
    state.record([A])
    assert state.rebuild([B, C, C]) == 2
    assert A.path not in state
    again = Tier2State(tmp_path)
    assert again.load() == 2 and set(again) == {B, C}


def test_garbage_lines_and_unjournalable_paths(tmp_path: Path) -> None:
    (tmp_path / "tier2").mkdir()
    (tmp_path / JOURNAL).write_bytes(b"x\ty\n\tnope\t1\npath\t" + b"a" * 64 + b"\t-5\n" + A.line())
    state = Tier2State(tmp_path)
    assert state.load() == 1 and A.path in state
    with pytest.raises(ValueError):
        Tier2Entry("a\tb", "-", 1).line()


def test_objects_retention_deleted_are_no_longer_trusted(tmp_path: Path) -> None:
    state = Tier2State(tmp_path)
    state.load()
    state.record([A, B])
    tombstones = tmp_path / TOMBSTONES
    tombstones.write_bytes(B.line())  # retention deleted B from the bucket
    assert A.path in state and B.path not in state and state.get(B.path) is None
    state.record([B])  # the relay uploaded it again for a new backup
    assert B.path in state  # an old tombstone does not hide the new upload
    with tombstones.open("ab") as f:
        f.write(A.line()[:-3])  # a torn tombstone is not applied until complete
    assert A.path in state
    again = Tier2State(tmp_path)
    # after a restart tombstones win over journal lines (conservative: B is checked again)
    assert again.load() == 1 and A.path in again and B.path not in again
