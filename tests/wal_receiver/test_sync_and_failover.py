"""Synchronous standby behaviour, and following a promoted standby onto timeline 2."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import psycopg

from klio_common.pg.lsn import Lsn
from klio_common.runtime.settings import Settings
from klio_dev.waiting import wait_until
from tests.wal_receiver.helpers import (
    KLIO,
    ReceiverProcess,
    archive_end,
    archive_of,
    close_segment,
    load,
    postgres_dir,
    receiver_inprocess,
    restored_server,
    synchronous_standby,
    wait_archived,
    wait_closed,
    wal_verify,
    write_config,
)


def test_synchronous_commit_waits_for_the_archive(
    pg: Any, nats_server: Any, tier1_dir: Path, keyring_files: dict[str, Path], workdir: Path
) -> None:
    config = write_config(
        workdir / "klio.yaml",
        pg=pg,
        nats_url=nats_server.url,
        tier1=tier1_dir,
        keys=keyring_files,
        synchronous=True,
    )
    settings = load(config)
    proc = ReceiverProcess(config, workdir / "receiver.log")
    proc.start()
    try:
        with synchronous_standby(pg):
            _commit_waits_for_the_receiver(pg, proc, settings)
    finally:
        proc.stop()


def _commit_waits_for_the_receiver(pg: Any, proc: ReceiverProcess, settings: Settings) -> None:
    """A COMMIT waits while the receiver is stopped, and is archived when it returns."""
    pg.execute("CREATE TABLE t (v int)")
    proc.signal(signal.SIGSTOP)
    done = threading.Event()
    commit_lsn: list[int] = []

    def commit() -> None:
        with psycopg.connect(pg.superuser_conninfo(), autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (42)")
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            commit_lsn.append(int(Lsn.parse(row[0])))
        done.set()

    worker = threading.Thread(target=commit)
    worker.start()
    # the COMMIT is waiting for the receiver's flush: visible as a SyncRep wait, not a guess
    wait_until(
        lambda: (
            pg.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")[0][0] == 1
        ),
        30,
        "a SyncRep wait",
    )
    assert not done.is_set()
    proc.signal(signal.SIGCONT)
    worker.join(60)
    assert done.is_set()
    wait_archived(settings, commit_lsn[0] - 200, timeout=10)
    # the row's WAL is durable in the archive before the COMMIT returned
    assert archive_end(settings) >= commit_lsn[0] - 200


def test_follows_promoted_standby_onto_timeline_2(
    pg: Any,
    pg_factory: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    workdir: Path,
) -> None:
    standby = pg.make_standby("standby")
    backup = postgres_dir(workdir / "backup")
    pg.run_as_postgres(
        [
            "pg_basebackup",
            "-X",
            "none",
            "-c",
            "fast",
            "-D",
            str(backup),
            "-d",
            pg.superuser_conninfo(),
        ]
    )
    config = write_config(
        workdir / "klio.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=keyring_files
    )
    settings = load(config)
    with receiver_inprocess(settings):
        pg.execute("CREATE TABLE marker (id int, tli int)")
        pg.execute("INSERT INTO marker SELECT g, 1 FROM generate_series(1, 100) g")
        close_segment(pg, settings)
    pg.stop()
    standby.promote()
    standby.execute("SELECT pg_create_physical_replication_slot('klio', true)")
    config2 = write_config(
        workdir / "klio2.yaml",
        pg=standby,
        nats_url=nats_server.url,
        tier1=tier1_dir,
        keys=keyring_files,
    )
    settings2 = load(config2)
    with receiver_inprocess(settings2):
        standby.execute("INSERT INTO marker SELECT g, 2 FROM generate_series(101, 200) g")
        end2 = standby.current_lsn()
        standby.switch_wal()
        wait_closed(settings2, end2)
    archive = archive_of(settings2)
    assert 2 in archive.list_history()
    assert any(s.timeline == 2 for s in archive.list_segments())
    verify = wal_verify(config2)
    assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()
    restored = restored_server(
        workdir,
        backup,
        restore_command=f"{KLIO} --config {config2} wal-restore %f %p",
        settings={"recovery_target_timeline": "latest"},
    )
    restored.start()
    wait_until(lambda: restored.sql("SELECT NOT pg_is_in_recovery()")[0][0], 120, "promotion")
    assert restored.sql("SELECT count(*), max(tli) FROM marker")[0] == (200, 2)


def test_synchronous_receiver_rides_out_a_primary_restart(
    pg: Any, nats_server: Any, tier1_dir: Path, keyring_files: dict[str, Path], workdir: Path
) -> None:
    # A shutdown ends the COPY from the server's side (CopyDone): the streaming thread hands the
    # stream back to the loop, which answers, reconnects with backoff and resumes where it was.
    config = write_config(
        workdir / "klio.yaml",
        pg=pg,
        nats_url=nats_server.url,
        tier1=tier1_dir,
        keys=keyring_files,
        synchronous=True,
        status_interval=0.2,
    )
    settings = load(config)
    with receiver_inprocess(settings):
        pg.execute("CREATE TABLE r (v int)")
        pg.execute("INSERT INTO r SELECT g FROM generate_series(1, 1000) g")
        wait_archived(settings, pg.current_lsn())
        pg.stop("fast")
        pg.start()
        pg.execute("INSERT INTO r SELECT g FROM generate_series(1001, 2000) g")
        close_segment(pg, settings)
    archive = archive_of(settings)
    numbers = [s.segno for s in archive.list_segments()]
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), "gap in the archive"
    verify = wal_verify(config)
    assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()
