"""Recovery targets: parsing, the choice of backup, and the settings PostgreSQL recovers with."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from klio_common import fsio
from klio_common.catalog.backups import BackupManifest
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.errors import KlioError, NotFound
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment, history_name
from klio_restore.walverify import check_continuity

if TYPE_CHECKING:
    from klio_restore.tier2 import BucketWal

KINDS = ("time", "lsn", "xid", "name", "immediate")
_XID_RE = re.compile(r"[0-9]{1,20}")
_TIMELINE_RE = re.compile(r"latest|current|[1-9][0-9]{0,9}")
_MAX_NAME = 63  # PostgreSQL's restore point names are at most MAXFNAMELEN - 1 bytes
TIME_TARGET_SLACK = 60.0
"""Seconds a time target may lie past the time the newest archived segment was stored.

The archive cannot say which commit times a segment holds without decoding it; the time it was
stored bounds them from above, give or take clock skew between the primary and the receiver and
the receiver's lag. Past this slack, recovery would almost surely end before the target
(PostgreSQL then stops with FATAL), so restore refuses up front.
"""
_TIME_HINT = "give a time with zone, e.g. '2026-11-24 21:38:00+00' or '2026-11-24T21:38:00Z'"


class TargetError(KlioError):
    """A recovery target (or its combination with a backup) is not usable."""


@dataclass(frozen=True)
class RecoveryTarget:
    """Where recovery stops.

    Attributes:
        kind: ``time``, ``lsn``, ``xid``, ``name``, ``immediate``, or None for the end of the
            archive.
        value: the target as PostgreSQL's ``recovery_target_<kind>`` takes it (time in ISO
            8601 with offset, LSN ``X/Y``, decimal xid, the name); empty for immediate/None.
        inclusive: stop after (True) or just before (False) the target.
        timeline: ``latest``, ``current`` or a timeline id as text.
    """

    kind: str | None = None
    value: str = ""
    inclusive: bool = True
    timeline: str = "latest"

    @property
    def time(self) -> datetime | None:
        """The target time, for ``kind == "time"``."""
        return datetime.fromisoformat(self.value) if self.kind == "time" else None

    @property
    def lsn(self) -> Lsn | None:
        """The target LSN, for ``kind == "lsn"``."""
        return Lsn.parse(self.value) if self.kind == "lsn" else None

    def describe(self) -> str:
        """The target for people: ``time 2026-11-24 21:38:00+00:00``, ``end of the archive``."""
        if self.kind is None:
            return "end of the archive"
        if self.kind == "immediate":
            return "immediate (end of the backup)"
        return f"{self.kind} {self.value}" + ("" if self.inclusive else " (exclusive)")

    def document(self) -> dict[str, object]:
        """The ``--json`` form."""
        return {
            "kind": self.kind,
            "value": self.value or None,
            "inclusive": self.inclusive,
            "timeline": self.timeline,
        }


def parse_time(text: str) -> datetime:
    """Parse a target time; a zone is required (PostgreSQL would otherwise use its own).

    Raises:
        TargetError: not a time with zone.
    """
    raw = text.strip()
    for suffix in (" UTC", " utc", " GMT"):
        if raw.endswith(suffix):
            raw = raw.removesuffix(suffix) + "+00:00"
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise TargetError(f"invalid target time {text!r}", hint=_TIME_HINT) from None
    if value.tzinfo is None:
        raise TargetError(f"target time {text!r} has no time zone", hint=_TIME_HINT)
    return value


def parse_target(
    *,
    time: str | None = None,
    lsn: str | None = None,
    xid: str | None = None,
    name: str | None = None,
    immediate: bool = False,
    timeline: str | None = None,
    exclusive: bool = False,
) -> RecoveryTarget:
    """Build the recovery target from the ``--target-*`` options (at most one of them).

    Raises:
        TargetError: more than one target, or a value PostgreSQL would not accept.
    """
    values = (time, lsn, xid, name, immediate or None)
    given = [k for k, v in zip(KINDS, values, strict=True) if v is not None]
    if len(given) > 1:
        raise TargetError(
            "more than one recovery target: " + ", ".join(f"--target-{k}" for k in given),
            hint="give at most one of --target-time, --target-lsn, --target-xid, "
            "--target-name, --target-immediate",
        )
    tli = (timeline or "latest").strip().lower()
    if not _TIMELINE_RE.fullmatch(tli):
        raise TargetError(
            f"invalid target timeline {timeline!r}",
            hint="give 'latest' (the default), 'current' or a timeline id such as 2",
        )
    if exclusive and (not given or given[0] == "immediate"):
        raise TargetError(
            "--target-exclusive needs a time, LSN, xid or name target",
            hint="drop --target-exclusive, or add a target",
        )
    kind = given[0] if given else None
    value = ""
    if kind == "time":
        assert time is not None
        value = parse_time(time).isoformat(sep=" ")
    elif kind == "lsn":
        assert lsn is not None
        try:
            value = str(Lsn.parse(lsn))
        except ValueError as exc:
            hint = "give an LSN as PostgreSQL prints it: 0/3000028"
            raise TargetError(str(exc), hint=hint) from None
    elif kind == "xid":
        assert xid is not None
        if not _XID_RE.fullmatch(xid.strip()) or not 3 <= int(xid) < 2**64:
            raise TargetError(
                f"invalid target xid {xid!r}",
                hint="give a decimal transaction id of 3 or more, as txid_current() returns",
            )
        value = str(int(xid))
    elif kind == "name":
        assert name is not None
        if not name or len(name.encode()) > _MAX_NAME:
            raise TargetError(
                f"invalid target name {name!r}",
                hint=f"a restore point name has 1 to {_MAX_NAME} bytes",
            )
        value = name
    return RecoveryTarget(kind=kind, value=value, inclusive=not exclusive, timeline=tli)


def choose_backup(
    manifests: Sequence[BackupManifest], target: RecoveryTarget, backup_id: str | None = None
) -> BackupManifest:
    """The backup to restore for ``target``.

    A time target takes the newest backup with ``end_time < target``; an LSN target the newest
    with ``end_lsn <= target``; any other target the newest backup. ``backup_id`` (not
    ``latest``) names the backup instead, which must still end before a time or LSN target.

    Args:
        manifests: committed backups (any order).
        target: the recovery target.
        backup_id: ``--backup``; None or ``latest`` lets the target choose.

    Raises:
        NotFound: no backups, or no such backup.
        TargetError: the target lies before every backup's end (or the named backup's).
    """
    if not manifests:
        raise NotFound(
            "there are no backups to restore from",
            hint="take one with 'klio backup run --wait' (the klio-basebackup service must run)",
        )
    ordered = sorted(manifests, key=lambda m: (m.end_time, m.id))
    if backup_id not in (None, "latest"):
        chosen = [m for m in ordered if m.id == backup_id]
        if not chosen:
            raise NotFound(
                f"backup {backup_id} does not exist",
                hint="list the backups with 'klio backup list', or use --backup latest",
            )
        candidates = chosen
    else:
        candidates = ordered
    fitting = [m for m in candidates if _ends_before(m, target)]
    if fitting:
        return fitting[-1]
    first = candidates[0]
    what = "the earliest backup" if len(candidates) > 1 or backup_id is None else "backup"
    end = first.end_time.isoformat(sep=" ") if target.kind == "time" else first.end_lsn
    raise TargetError(
        f"target {target.describe()} is before the end of {what} {first.id} ({end}): "
        "a backup can only be recovered forward from its end",
        hint="choose a later target"
        + (", or another backup" if backup_id not in (None, "latest") else "")
        + "; 'klio backup list' shows each backup's end time and LSN",
    )


def _ends_before(manifest: BackupManifest, target: RecoveryTarget) -> bool:
    if target.kind == "time":
        when = target.time
        assert when is not None
        return _aware(manifest.end_time) < when
    if target.kind == "lsn":
        lsn = target.lsn
        assert lsn is not None
        return Lsn.parse(manifest.end_lsn) <= lsn
    return True


def check_archive_reach(
    archive: WalArchive | BucketWal,
    keyring: KeyRing,
    backup: BackupManifest,
    target: RecoveryTarget,
) -> None:
    """Refuse a restore whose WAL the archive does not hold (names only, nothing decoded).

    Recovery needs every segment from the backup's start on the path to the newest timeline:
    up to the target LSN's segment for an LSN target, up to the backup's end for
    ``immediate``, and up to the newest archived segment otherwise (a gap there would end
    recovery early and promote with committed transactions missing). Only complete segments
    count: ``restore_command`` never gets a ``.partial``. ``archive`` is Tier 1's, or the
    bucket's for a restore from Tier 2.

    Raises:
        NotFound: there is no WAL archive for the cluster.
        TargetError: a segment or history file is missing, or the target lies past the archive.
        CorruptObject: an archived history file fails its checks.
    """
    seg_size = archive.segment_size()
    histories = {tli: archive.read_history(tli, keyring) for tli in archive.list_history()}
    cont = check_continuity(archive.list_segments(seg_size), histories, seg_size)
    start = WalSegment.parse(backup.wal_start_segment, seg_size)
    backup_end = WalSegment.parse(backup.wal_end_segment, seg_size)
    switch_hint = (
        "the archive holds complete segments only: run SELECT pg_switch_wal() on the primary "
        "and wait for the wal-receiver to archive the segment, or choose an earlier target"
    )
    if cont.first is None or cont.last is None or start.segno < cont.first.segno:
        first = cont.first.name if cont.first else "nothing"
        raise TargetError(
            f"the WAL archive does not hold the start of backup {backup.id} "
            f"({backup.wal_start_segment}; the oldest archived segment is {first})",
            hint="choose a newer backup; 'klio wal verify' lists what the archive holds",
        )
    if target.kind == "lsn":
        lsn = target.lsn
        assert lsn is not None
        need = max(backup_end.segno, lsn // seg_size)
        if cont.last.segno < need:
            raise TargetError(
                f"target LSN {lsn} is beyond the end of the WAL archive "
                f"({cont.last.end_lsn}, the end of segment {cont.last.name})",
                hint=switch_hint,
            )
    elif target.kind == "immediate":
        need = backup_end.segno
    else:
        need = cont.last.segno
    if cont.last.segno < backup_end.segno:
        raise TargetError(
            f"the WAL archive ends at segment {cont.last.name}, before the end of backup "
            f"{backup.id} ({backup.wal_end_segment})",
            hint="wait for the wal-receiver to archive the backup's WAL; 'klio wal status' "
            "shows how far it got",
        )
    for gap in cont.gaps:
        if gap.first.segno <= need and gap.last.segno >= start.segno:
            raise TargetError(
                f"the WAL archive misses {gap.first.name} .. {gap.last.name} "
                f"(LSN {gap.start_lsn} to {gap.end_lsn}), which recovery from backup "
                f"{backup.id} to {target.describe()} needs",
                hint="restore the segments from Tier 2 or another copy, or choose a target "
                "before the gap; 'klio wal verify' lists every gap",
            )
    if cont.missing_histories:
        names = ", ".join(history_name(t) for t in cont.missing_histories)
        raise TargetError(
            f"the WAL archive misses timeline history file(s) {names}",
            hint="recovery cannot follow a timeline switch without them; restore them from "
            "Tier 2 or another copy",
        )
    when = target.time
    if when is not None:
        stored = _stored_at(archive, cont.last.name)
        if when.timestamp() > stored + TIME_TARGET_SLACK:
            at = datetime.fromtimestamp(stored, UTC).isoformat(sep=" ", timespec="seconds")
            raise TargetError(
                f"target time {target.value} is past the end of the WAL archive: its newest "
                f"segment {cont.last.name} was stored at {at}",
                hint=switch_hint,
            )


def _stored_at(archive: WalArchive | BucketWal, name: str) -> int:
    if isinstance(archive, WalArchive):
        return archive.header(archive.segment_path(name)).created_at
    return archive.stored_at(name)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def wal_restore_command(klio: Path, config: Path, cluster: str | None = None) -> str:
    """The ``restore_command`` running ``klio wal-restore`` with absolute paths.

    Args:
        klio: the ``klio`` program (made absolute).
        config: the configuration file (made absolute).
        cluster: passed as ``--cluster`` when not None (needed with several clusters).
    """
    argv = [str(Path(klio).absolute()), "--config", str(Path(config).absolute())]
    if cluster is not None:
        argv += ["--cluster", cluster]
    return " ".join(shlex.quote(a) for a in argv) + " wal-restore %f %p"


def recovery_settings(target: RecoveryTarget, restore_command: str) -> dict[str, str]:
    """The settings written to ``postgresql.auto.conf``, in order."""
    settings = {"restore_command": restore_command}
    if target.kind == "immediate":
        settings["recovery_target"] = "immediate"
    elif target.kind is not None:
        settings[f"recovery_target_{target.kind}"] = target.value
        settings["recovery_target_inclusive"] = "on" if target.inclusive else "off"
    settings["recovery_target_timeline"] = target.timeline
    settings["recovery_target_action"] = "promote"
    return settings


def conf_line(name: str, value: str) -> str:
    """One ``name = 'value'`` line, quoted as PostgreSQL's configuration parser reads it."""
    return f"{name} = '" + value.replace("\\", "\\\\").replace("'", "''") + "'\n"


def write_recovery(pgdata: Path, settings: dict[str, str], *, file_mode: int = 0o600) -> None:
    """Append the settings to ``postgresql.auto.conf`` and create ``recovery.signal``.

    Settings in ``postgresql.auto.conf`` override ``postgresql.conf``; appended lines override
    earlier ones in the same file, so restoring a primary's own recovery settings is harmless.
    """
    auto = pgdata / "postgresql.auto.conf"
    old = auto.read_text() if auto.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    text = old + "# recovery settings written by klio restore\n"
    text += "".join(conf_line(k, v) for k, v in settings.items())
    fsio.atomic_write(auto, text.encode(), file_mode=file_mode, dir_mode=0o700)
    fsio.atomic_write(pgdata / "recovery.signal", b"", file_mode=file_mode, dir_mode=0o700)
