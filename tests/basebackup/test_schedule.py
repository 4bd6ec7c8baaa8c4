"""The runner's bookkeeping without servers: stale leases from crashes, and the cron loop."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from klio_basebackup import schedule
from klio_basebackup.backup import ClusterContext
from klio_basebackup.schedule import ClusterRunner, check_schedule
from klio_basebackup.state import BackupMetrics
from klio_common.catalog.backups import BackupCatalog, BackupManifest, Lease
from klio_common.catalog.chunks import ChunkStore
from klio_common.catalog.wal import WalArchive
from klio_common.compression import get as get_codec
from klio_common.crypto import KeyRing
from klio_common.errors import ConfigError
from klio_common.events import BackupFailed, codec
from klio_common.runtime.outbox import Outbox
from klio_common.runtime.settings import BackupSettings, ClusterSettings


def _runner(tmp_path: Path, schedule_: str | None = None) -> ClusterRunner:
    zstd = get_codec("zstd", 1)
    keys = KeyRing.none()
    ctx = ClusterContext(
        cluster=ClusterSettings(name="main", conninfo="host=x", backup_schedule=schedule_),
        backup=BackupSettings(),
        archive=WalArchive(tmp_path, "main"),
        catalog=BackupCatalog(tmp_path / "main", keys, zstd),
        store=ChunkStore(tmp_path / "main", keys, zstd),
        outbox=Outbox(tmp_path / "main" / "outbox" / "basebackup"),
        wake=lambda: None,
        keyring=keys,
        codec=zstd,
        metrics=BackupMetrics(),
    )
    return ClusterRunner(ctx)


def _lease(catalog: BackupCatalog, backup_id: str, pid: int, host: str, age: float = 0) -> None:
    path = catalog.lease_path(backup_id)
    path.parent.mkdir(parents=True)
    lease = Lease(id=backup_id, pid=pid, host=host, started_at=time.time())
    path.write_bytes(msgspec.json.encode(lease))
    os.utime(path, (time.time() - age, time.time() - age))


def test_reconcile_removes_crashed_backups_only(tmp_path: Path) -> None:
    runner = _runner(tmp_path)
    catalog = runner.ctx.catalog
    here = socket.gethostname()
    gone_pid = subprocess.Popen(["true"])
    gone_pid.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        _lease(catalog, "20250101T000001Z", gone_pid.pid, here)
        _lease(catalog, "20250101T000002Z", os.getpid(), here)  # a restarted container's pid
        _lease(catalog, "20250101T000003Z", live.pid, here)
        _lease(catalog, "20250101T000004Z", 1, "elsewhere", age=schedule.STALE_AFTER + 60)
        _lease(catalog, "20250101T000005Z", 1, "elsewhere", age=10)
        (catalog.dir / "20250101T000006Z").mkdir()  # crashed before its lease was written
        now = datetime.now(UTC)
        committed = BackupManifest(
            id="20250101T000007Z", cluster="main", system_id="1", pg_version=150000, timeline=1,
            start_lsn="0/2000028", end_lsn="0/2000100", start_time=now, end_time=now,
            label="klio", chunk_size=131072, compression="zstd", key_id=None, size=0,
            stored_size=0, new_chunk_bytes=0, chunks_total=0, chunks_new=0,
            wal_start_segment="000000010000000000000002",
            wal_end_segment="000000010000000000000002",
        )  # fmt: skip
        catalog.commit(committed)
        removed = runner.reconcile()
        assert sorted(removed) == [
            "20250101T000001Z",
            "20250101T000002Z",
            "20250101T000004Z",
            "20250101T000006Z",
        ]
        assert sorted(p.name for p in catalog.dir.iterdir()) == [
            "20250101T000003Z",
            "20250101T000005Z",
            "20250101T000007Z",
        ]
        failed = [codec.decode(p.read_bytes()) for p in runner.ctx.outbox.pending()]
        assert all(isinstance(e, BackupFailed) for e in failed)
        assert sorted(e.backup_id for e in failed if isinstance(e, BackupFailed)) == [
            "20250101T000001Z",
            "20250101T000002Z",
            "20250101T000004Z",
        ]
    finally:
        live.kill()
        live.wait()


async def test_schedule_fires_on_time_and_runs_missed_times_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = datetime.now().astimezone()
    times = iter(
        [
            start + timedelta(seconds=0.1),
            start - timedelta(seconds=5),  # already past when reached: skipped, not run
            start + timedelta(seconds=0.3),
            start + timedelta(hours=1),
        ]
    )

    class FakeCron:
        def __init__(self, expression: str, base: datetime) -> None:
            assert expression == "0 3 * * *"

        def get_next(self, _type: type) -> datetime:
            return next(times)

    monkeypatch.setattr(schedule, "croniter", FakeCron)
    runner = _runner(tmp_path, "0 3 * * *")
    fired: list[datetime] = []
    stop = asyncio.Event()

    def scheduled() -> None:
        fired.append(datetime.now().astimezone())
        if len(fired) == 2:
            stop.set()

    runner.scheduled = scheduled  # type: ignore[method-assign]
    await asyncio.wait_for(runner.run_schedule(stop), 30)
    assert len(fired) == 2
    assert fired[0] >= start + timedelta(seconds=0.1)
    assert fired[1] >= start + timedelta(seconds=0.3)


def test_invalid_cron_expression_is_a_config_error() -> None:
    check_schedule("main", "0 3 * * *")
    check_schedule("main", "@daily")
    check_schedule("main", None)
    with pytest.raises(ConfigError, match="backup_schedule"):
        check_schedule("main", "61 3 * * *")
