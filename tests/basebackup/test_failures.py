"""Backups that must not count (a crash, WAL never archived), and requests at the edges."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from klio_basebackup.backup import APPLICATION_NAME
from klio_common.runtime.settings import Settings
from klio_dev.waiting import wait_until
from tests.basebackup.helpers import (
    BasebackupProcess,
    basebackup_inprocess,
    catalog_of,
    events,
    request_backup,
    store_of,
    wait_backups,
    wait_event,
)
from tests.fixtures.paths import KlioConfigWriter, Volume
from tests.wal_receiver.helpers import random_row, receiver_inprocess


def _config(
    klio_config: KlioConfigWriter, pg: Any, nats: Any, tier1: Path, keys: Any, **backup: Any
) -> Settings:
    path = klio_config(
        pg=pg,
        nats=nats,
        tier1=tier1,
        keys=keys,
        cluster={"status_interval": 1.0},
        extra={"backup": backup},
    )
    return Settings.load(path, {})


def _phase(catalog: Any, backup_id: str) -> str | None:
    try:
        doc = json.loads((catalog.backup_dir(backup_id) / "progress.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return str(doc["phase"])


def test_kill_9_mid_backup_leaves_nothing_visible(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    pg.pgbench_init(scale=1)
    settings = _config(klio_config, pg, nats_server, tier1_dir, keyring_files, wal_timeout=600)
    config = workdir / "klio.yaml"
    catalog = catalog_of(settings)
    service = BasebackupProcess(config, workdir / "basebackup.log")
    service.start()
    try:
        request_backup(settings)
        # No wal-receiver runs yet, so the backup streams all its files, then waits for its WAL.
        (lease,) = wait_until(catalog.leases, 60, "the backup's lease")
        wait_until(lambda: _phase(catalog, lease.id) == "waiting for WAL", 60, "the WAL wait")
        assert lease.pid == service.proc.pid  # type: ignore[union-attr]
        orphans = set(store_of(settings).iter_ids())
        assert orphans
        service.kill()
        assert catalog.ids() == []
        assert [stale.id for stale in catalog.leases()] == [lease.id]
        with receiver_inprocess(settings):
            service.start()
            wait_until(
                lambda: not catalog.backup_dir(lease.id).exists(), 60, "the stale lease gone"
            )
            failed = wait_event(nats_server.url, "klio.main.backup.failed")
            assert failed[0]["backup_id"] == lease.id
            assert "stopped before backup" in failed[0]["reason"]
            request_backup(settings)
            (backup_id,) = wait_backups(settings, 1)
            assert service.stop() == 0
    finally:
        service.stop()
    manifest = catalog.load(backup_id)
    assert backup_id != lease.id
    # Chunks the crashed backup left were not trusted: the committed backup wrote its own.
    assert manifest.chunks_new == manifest.chunks_total
    assert {c for f in manifest.files for c in f.chunks} & orphans
    assert not catalog.leases()
    log = (workdir / "basebackup.log").read_text()
    assert f"removed unfinished backup {lease.id}" in log


def test_backup_whose_wal_is_never_archived_fails_cleanly(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    klio_config: KlioConfigWriter,
) -> None:
    settings = _config(klio_config, pg, nats_server, tier1_dir, None, wal_timeout=2)
    catalog = catalog_of(settings)
    with basebackup_inprocess(settings):
        request_backup(settings)
        (failed,) = wait_event(nats_server.url, "klio.main.backup.failed")
    (started,) = events(nats_server.url, "klio.main.backup.started")
    assert failed["backup_id"] == started["backup_id"]
    reason = failed["reason"]
    assert reason.startswith("WAL segment 0000000100000000000000"), reason
    assert f"needed by backup {started['backup_id']} was not archived within 2 s" in reason
    assert catalog.ids() == [] and catalog.leases() == []
    assert list(catalog.dir.iterdir()) == []
    assert events(nats_server.url, "klio.main.backup.done") == []


def test_requests_unknown_cluster_dead_lettered_and_two_at_once_share_a_backup(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    settings = _config(klio_config, pg, nats_server, tier1_dir, keyring_files, wal_timeout=60)
    with receiver_inprocess(settings), basebackup_inprocess(settings):
        request_backup(settings, "for-other", cluster="other")
        request_backup(settings, "first", "second")
        (letter,) = wait_event(nats_server.url, "klio.other.deadletter")
        started = wait_event(nats_server.url, "klio.main.backup.started", count=2)
        (done,) = wait_event(nats_server.url, "klio.main.backup.done")
        assert wait_backups(settings, 1) == [done["backup_id"]]
    assert "unknown cluster 'other'" in letter["reason"]
    assert letter["subject"] == "klio.other.backup.requested"
    assert sorted(e["request_id"] for e in started) == ["first", "second"]
    assert {e["backup_id"] for e in started} == {done["backup_id"]}
    assert len(events(nats_server.url, "klio.main.backup.started")) == 2
    assert catalog_of(settings).ids() == [done["backup_id"]]


def test_stopping_the_service_mid_backup_aborts_and_says_so(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    klio_config: KlioConfigWriter,
) -> None:
    settings = _config(klio_config, pg, nats_server, tier1_dir, None, wal_timeout=600)
    catalog = catalog_of(settings)
    with basebackup_inprocess(settings):
        request_backup(settings)
        (lease,) = wait_until(catalog.leases, 60, "the backup's lease")
        wait_until(lambda: _phase(catalog, lease.id) == "waiting for WAL", 60, "the WAL wait")
    (failed,) = events(nats_server.url, "klio.main.backup.failed")
    assert failed["backup_id"] == lease.id
    assert failed["reason"] == "the basebackup service stopped during the backup"
    assert catalog.ids() == [] and list(catalog.dir.iterdir()) == []


def test_backup_onto_a_full_volume_fails_cleanly_and_the_next_succeeds(
    pg: Any,
    nats_server: Any,
    small_volume: Callable[..., Volume],
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    # 40 MB that no compression shrinks, on a 24 MB volume: the backup runs out of space.
    pg.execute("CREATE TABLE noise (b bytea)")
    for _ in range(10):
        pg.execute(random_row("noise", 4))
    volume = small_volume(24)
    settings = _config(klio_config, pg, nats_server, volume.path, keyring_files, wal_timeout=60)
    catalog = catalog_of(settings)
    with receiver_inprocess(settings), basebackup_inprocess(settings):
        request_backup(settings, "too-big")
        (failed,) = wait_event(nats_server.url, "klio.main.backup.failed")
        assert failed["request_id"] == "too-big"
        assert "no space left on device" in failed["reason"], failed["reason"]
        assert catalog.ids() == [] and catalog.leases() == []
        assert not catalog.backup_dir(failed["backup_id"]).exists()
        # None left behind. The receiver, which retries its segment on the full volume meanwhile,
        # has a temp file for an instant at each try: wait for a moment without one.
        wait_until(
            lambda: not [p for p in volume.path.rglob("*") if ".tmp-" in p.name],
            30,
            "no half-written file on the volume",
        )
        # What it stored went with it (before it was announced): the space is free again.
        assert list(store_of(settings).iter_ids()) == []

        volume.grow(160)
        request_backup(settings, "again")
        (done,) = wait_event(nats_server.url, "klio.main.backup.done")
    assert catalog.ids() == [done["backup_id"]]
    manifest = catalog.load(done["backup_id"])
    assert manifest.chunks_new == manifest.chunks_total  # nothing the failed backup left trusted


def test_a_primary_crash_mid_backup_fails_it_cleanly_and_the_next_succeeds(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    pg.pgbench_init(scale=5)
    settings = _config(klio_config, pg, nats_server, tier1_dir, keyring_files, wal_timeout=60)
    catalog = catalog_of(settings)
    with basebackup_inprocess(settings):
        request_backup(settings, "crashed")
        # Freeze the backup's walsender as soon as it appears, so the crash lands mid-backup.
        walsender = wait_until(lambda: _walsender(pg), 60, "the backup's walsender")
        os.kill(walsender, signal.SIGSTOP)
        (lease,) = catalog.leases()
        pg.kill()  # as a node crash: the connection drops
        (failed,) = wait_event(nats_server.url, "klio.main.backup.failed")
        assert failed["request_id"] == "crashed" and failed["backup_id"] == lease.id
        assert catalog.ids() == [] and catalog.leases() == []
        assert list(store_of(settings).iter_ids()) == []  # what it stored went with it

        pg.start()
        with receiver_inprocess(settings):
            request_backup(settings, "again")
            (done,) = wait_event(nats_server.url, "klio.main.backup.done")
    assert catalog.ids() == [done["backup_id"]]
    assert f"connection to PostgreSQL at 127.0.0.1:{pg.port} lost" in failed["reason"], failed


def _walsender(pg: Any) -> int | None:
    rows = pg.sql(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender'"
        " AND application_name = %s",
        [APPLICATION_NAME],
    )
    return int(rows[0][0]) if rows else None
