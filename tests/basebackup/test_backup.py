"""Base backups end to end: a tablespace, pg_verifybackup on the stored files, dedup, progress."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from klio_basebackup.service import build_runners
from klio_basebackup.state import BackupMetrics
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_common.runtime.settings import Settings
from klio_dev.waiting import wait_until
from tests.basebackup.helpers import (
    basebackup_inprocess,
    catalog_of,
    events,
    make_tablespace,
    materialise,
    request_backup,
    store_of,
    verify_backup,
    wait_backups,
    wait_event,
)
from tests.fixtures.paths import KlioConfigWriter
from tests.wal_receiver.helpers import archive_of, receiver_inprocess


def test_backup_with_tablespace_commits_verifies_and_dedupes(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    oid = make_tablespace(pg, workdir / "ts")
    pg.pgbench_init(scale=2)
    config = klio_config(
        pg=pg,
        nats=nats_server,
        tier1=tier1_dir,
        keys=keyring_files,
        cluster={"status_interval": 1.0},
        extra={"backup": {"chunk_size": 65536, "jobs": 2, "wal_timeout": 60}},
    )
    settings = Settings.load(config, {})
    catalog = catalog_of(settings)
    port = settings.service("basebackup").http_port
    with receiver_inprocess(settings), basebackup_inprocess(settings):
        (first_request,) = request_backup(settings)
        (first_id,) = wait_backups(settings, 1)
        pg.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1")
        pg.execute("CHECKPOINT")
        request_backup(settings)
        ids = wait_backups(settings, 2)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        done = wait_event(nats_server.url, "klio.main.backup.done", count=2)
    first, second = catalog.load(first_id), catalog.load(ids[1])
    # The catalog holds what PostgreSQL needs, and the WAL it needs is archived.
    paths = {f.path: f for f in first.files}
    for name in ("backup_manifest", "backup_label", "tablespace_map", "global/pg_control"):
        assert paths[name].type == "file" and paths[name].chunks, name
    assert paths[f"pg_tblspc/{oid}"].type == "dir"
    assert any(p.startswith(f"pg_tblspc/{oid}/PG_15_") and f.chunks for p, f in paths.items())
    assert first.tablespaces[0].oid == oid
    assert first.tablespaces[0].location == str(workdir / "ts")
    assert str(workdir / "ts") in store_of(settings).get(paths["tablespace_map"].chunks[0]).decode()
    assert first.key_id == "k1" and first.compression == "zstd" and first.chunk_size == 65536
    assert Lsn.parse(first.start_lsn) < Lsn.parse(first.end_lsn)
    archive = archive_of(settings)
    for name in (first.wal_start_segment, first.wal_end_segment):
        assert archive.segment_path(name).exists()
    end_seg = WalSegment.from_lsn(first.timeline, Lsn.parse(first.end_lsn) - 1)
    assert first.wal_end_segment == end_seg.name
    assert first.size == sum(f.size for f in first.files)
    assert first.chunks_new == first.chunks_total > 0
    assert first.new_chunk_bytes == first.stored_size
    # pg_verifybackup accepts the files materialised from the chunk store.
    out = verify_backup(materialise(settings, first, workdir / "restored"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backup successfully verified" in out.stdout
    # The second backup stored only what changed.
    assert second.chunks_total >= first.chunks_total - 5
    assert 0 < second.chunks_new <= second.chunks_total // 10, second
    assert second.new_chunk_bytes * 10 < second.stored_size
    assert second.new_chunk_bytes * 20 < second.size
    assert second.stored_size <= first.stored_size + second.new_chunk_bytes
    # Events and metrics say the same.
    assert [e["backup_id"] for e in done] == [first_id, ids[1]]
    assert done[1]["chunks_new"] == second.chunks_new
    started = events(nats_server.url, "klio.main.backup.started")
    assert started[0]["request_id"] == first_request
    assert started[0]["start_lsn"] == first.start_lsn
    text = metrics.decode()
    assert f'klio_backup_chunks_new{{cluster="main"}} {float(second.chunks_new)}' in text
    assert 'klio_backup_running{cluster="main"} 0.0' in text
    assert 'klio_backup_last_success_timestamp{cluster="main"}' in text
    assert not catalog.leases()
    assert not (catalog.backup_dir(first_id) / "progress.json").exists()
    # A restarted service reports the newest backup from the catalog, not nothing.
    restarted = BackupMetrics()
    restarted.last_success.labels("main").set(0)
    restarted.chunks_new.labels("main").set(-1)
    build_runners(settings, restarted)
    assert restarted.last_success.labels("main")._value.get() == second.end_time.timestamp()
    assert restarted.chunks_new.labels("main")._value.get() == second.chunks_new
    wait_until(
        lambda: not list((tier1_dir / "main" / "outbox" / "basebackup").iterdir()),
        10,
        "the outbox to drain",
    )
