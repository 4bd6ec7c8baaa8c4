"""Recovery targets, backup choice and recovery settings (pure logic, no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from klio_common.catalog.backups import BackupManifest
from klio_common.errors import NotFound
from klio_restore.recovery import (
    RecoveryTarget,
    TargetError,
    choose_backup,
    conf_line,
    parse_target,
    parse_time,
    recovery_settings,
    wal_restore_command,
    write_recovery,
)

T0 = datetime(2026, 11, 24, 21, 0, tzinfo=UTC)


def backup(n: int, end_minute: int, end_lsn: str) -> BackupManifest:
    return BackupManifest(
        id=f"b{n}",
        cluster="main",
        system_id="1",
        pg_version=150000,
        timeline=1,
        start_lsn="0/1000000",
        end_lsn=end_lsn,
        start_time=T0,
        end_time=T0 + timedelta(minutes=end_minute),
        label="x",
        chunk_size=131072,
        compression="zstd",
        key_id=None,
        size=0,
        stored_size=0,
        new_chunk_bytes=0,
        chunks_total=0,
        chunks_new=0,
        wal_start_segment="000000010000000000000001",
        wal_end_segment="000000010000000000000001",
    )


BACKUPS = [backup(2, 20, "0/5000000"), backup(1, 10, "0/3000000"), backup(3, 30, "0/7000000")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-24 21:38:00+00", datetime(2026, 11, 24, 21, 38, tzinfo=UTC)),
        ("2026-11-24T21:38:00Z", datetime(2026, 11, 24, 21, 38, tzinfo=UTC)),
        ("2026-11-24 21:38:00.250000+00", datetime(2026, 11, 24, 21, 38, 0, 250000, tzinfo=UTC)),
        ("2026-11-24 21:38+00", datetime(2026, 11, 24, 21, 38, tzinfo=UTC)),
        ("2026-11-24 21:38:00 UTC", datetime(2026, 11, 24, 21, 38, tzinfo=UTC)),
        (
            "2026-11-24 23:38:00+02:00",
            datetime(2026, 11, 24, 23, 38, tzinfo=timezone(timedelta(hours=2))),
        ),
    ],
)
def test_target_times_need_and_keep_their_zone(text: str, expected: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected and parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize("text", ["2026-11-24 21:38:00", "yesterday", "2026-13-01 00:00+00", ""])
def test_bad_or_zoneless_times_are_refused_with_a_hint(text: str) -> None:
    with pytest.raises(TargetError) as exc:
        parse_target(time=text)
    assert exc.value.hint and "zone" in exc.value.hint


def test_each_kind_of_target() -> None:
    assert parse_target() == RecoveryTarget()
    assert parse_target().describe() == "end of the archive"
    assert parse_target(lsn="0/3000028").value == "0/3000028"
    assert parse_target(lsn="16/b374d848").value == "16/B374D848"
    assert parse_target(xid="1234").value == "1234"
    assert parse_target(name="before_upgrade").value == "before_upgrade"
    assert parse_target(immediate=True).kind == "immediate"
    t = parse_target(time="2026-11-24 21:38:00+00", exclusive=True, timeline="2")
    assert (t.kind, t.value, t.inclusive, t.timeline) == (
        "time",
        "2026-11-24 21:38:00+00:00",
        False,
        "2",
    )
    assert t.time == datetime(2026, 11, 24, 21, 38, tzinfo=UTC)


@pytest.mark.parametrize(
    "options",
    [
        {"lsn": "0/XYZ"},
        {"lsn": "3000028"},
        {"xid": "abc"},
        {"xid": "2"},
        {"xid": "-5"},
        {"name": "x" * 64},
        {"time": "2026-11-24 21:38+00", "lsn": "0/1"},
        {"immediate": True, "name": "x"},
        {"timeline": "newest"},
        {"timeline": "0"},
        {"exclusive": True},
        {"exclusive": True, "immediate": True},
    ],
)
def test_invalid_targets_are_refused_with_a_hint(options: dict[str, object]) -> None:
    with pytest.raises(TargetError) as exc:
        parse_target(**options)  # type: ignore[arg-type]
    assert exc.value.hint


def test_time_target_takes_the_newest_backup_ending_strictly_before() -> None:
    at = (T0 + timedelta(minutes=25)).isoformat()
    assert choose_backup(BACKUPS, parse_target(time=at)).id == "b2"
    at = (T0 + timedelta(minutes=20)).isoformat()  # b2 ends exactly then: not before
    assert choose_backup(BACKUPS, parse_target(time=at)).id == "b1"
    at = (T0 + timedelta(hours=5)).isoformat()
    assert choose_backup(BACKUPS, parse_target(time=at)).id == "b3"


def test_lsn_target_takes_the_newest_backup_ending_at_or_before() -> None:
    assert choose_backup(BACKUPS, parse_target(lsn="0/5000000")).id == "b2"
    assert choose_backup(BACKUPS, parse_target(lsn="0/4FFFFFF")).id == "b1"
    assert choose_backup(BACKUPS, parse_target(lsn="1/0")).id == "b3"


@pytest.mark.parametrize(
    "target",
    [
        RecoveryTarget(),
        parse_target(xid="900"),
        parse_target(name="n"),
        parse_target(immediate=True),
    ],
)
def test_other_targets_take_the_newest_backup(target: RecoveryTarget) -> None:
    assert choose_backup(BACKUPS, target).id == "b3"
    assert choose_backup(BACKUPS, target, "latest").id == "b3"
    assert choose_backup(BACKUPS, target, "b1").id == "b1"


def test_targets_before_the_earliest_backup_are_refused() -> None:
    with pytest.raises(TargetError) as exc:
        choose_backup(BACKUPS, parse_target(time=(T0 + timedelta(minutes=5)).isoformat()))
    assert "before the end of the earliest backup b1" in exc.value.message
    assert exc.value.hint
    with pytest.raises(TargetError):
        choose_backup(BACKUPS, parse_target(lsn="0/3000000").__class__(kind="lsn", value="0/1"))


def test_a_named_backup_must_end_before_the_target() -> None:
    at = (T0 + timedelta(minutes=25)).isoformat()
    assert choose_backup(BACKUPS, parse_target(time=at), "b1").id == "b1"
    with pytest.raises(TargetError) as exc:
        choose_backup(BACKUPS, parse_target(time=at), "b3")
    assert "backup b3" in exc.value.message and "another backup" in (exc.value.hint or "")


def test_unknown_backups_and_empty_catalogs() -> None:
    with pytest.raises(NotFound) as exc:
        choose_backup(BACKUPS, RecoveryTarget(), "nope")
    assert "klio backup list" in (exc.value.hint or "")
    with pytest.raises(NotFound) as exc:
        choose_backup([], RecoveryTarget())
    assert "backup run" in (exc.value.hint or "")


def test_recovery_settings_per_target() -> None:
    cmd = "/venv/bin/klio --config /etc/klio.yaml wal-restore %f %p"
    assert recovery_settings(RecoveryTarget(), cmd) == {
        "restore_command": cmd,
        "recovery_target_timeline": "latest",
        "recovery_target_action": "promote",
    }
    assert recovery_settings(parse_target(immediate=True), cmd)["recovery_target"] == "immediate"
    got = recovery_settings(parse_target(xid="77", exclusive=True, timeline="current"), cmd)
    assert got["recovery_target_xid"] == "77"
    assert got["recovery_target_inclusive"] == "off"
    assert got["recovery_target_timeline"] == "current"
    got = recovery_settings(parse_target(name="n"), cmd)
    assert got["recovery_target_name"] == "n" and got["recovery_target_inclusive"] == "on"


def test_restore_command_is_absolute_and_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cmd = wal_restore_command(Path("/opt/klio env/bin/klio"), Path("conf/klio.yaml"))
    assert cmd == f"'/opt/klio env/bin/klio' --config {tmp_path}/conf/klio.yaml wal-restore %f %p"
    cmd = wal_restore_command(Path("/k"), Path("/c.yaml"), "db2")
    assert cmd == "/k --config /c.yaml --cluster db2 wal-restore %f %p"


def test_written_settings_are_quoted_and_appended(tmp_path: Path) -> None:
    assert conf_line("recovery_target_name", "it's") == "recovery_target_name = 'it''s'\n"
    auto = tmp_path / "postgresql.auto.conf"
    auto.write_text("# Do not edit this file manually!\nwork_mem = '8MB'")
    write_recovery(tmp_path, {"restore_command": "k %f %p", "recovery_target_name": "a\\b"})
    text = auto.read_text()
    assert text.startswith("# Do not edit this file manually!\nwork_mem = '8MB'\n")
    assert "restore_command = 'k %f %p'\n" in text
    assert "recovery_target_name = 'a\\\\b'\n" in text
    assert (tmp_path / "recovery.signal").exists()
    assert auto.stat().st_mode & 0o777 == 0o600
