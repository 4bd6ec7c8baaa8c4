"""The WAL archive under load: identical segments, PITR from it, kill -9, resume, leftovers."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_dev.waiting import wait_until
from tests.wal_receiver.helpers import (
    KLIO,
    ReceiverProcess,
    archive_end,
    archive_of,
    close_segment,
    keyring_of,
    load,
    postgres_dir,
    receiver_inprocess,
    restored_server,
    wait_archived,
    wal_restore,
    wal_verify,
    write_config,
)

PG_RECEIVEWAL = "/usr/lib/postgresql/15/bin/pg_receivewal"


def start_pg_receivewal(pg: Any, directory: Path) -> subprocess.Popen[bytes]:
    """pg_receivewal with its own slot, for a reference copy of the same WAL."""
    directory.mkdir(mode=0o777)
    pg.execute("SELECT pg_create_physical_replication_slot('ref', true)")
    return subprocess.Popen(
        [
            PG_RECEIVEWAL,
            "-D",
            str(directory),
            "-S",
            "ref",
            "-n",
            "--no-sync",
            "-d",
            pg.superuser_conninfo(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("encrypted", [True, False], ids=["zstd+aes", "plain"])
def test_closed_segments_are_byte_identical(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    workdir: Path,
    encrypted: bool,
) -> None:
    config = write_config(
        workdir / "klio.yaml",
        pg=pg,
        nats_url=nats_server.url,
        tier1=tier1_dir,
        keys=keyring_files if encrypted else None,
        compression="zstd" if encrypted else "none",
    )
    settings = load(config)
    ref = start_pg_receivewal(pg, workdir / "ref")
    try:
        with receiver_inprocess(settings):
            pg.pgbench_init(scale=5)
            pg.pgbench(clients=2, transactions=300)
            end = pg.current_lsn()
            pg.switch_wal()
            wait_archived(settings, end)
            seg_size = archive_of(settings).segment_size()
            last = WalSegment.from_lsn(1, end, seg_size)
            wait_until(lambda: (workdir / "ref" / last.name).exists(), 60, "pg_receivewal")
    finally:
        ref.terminate()
        ref.wait(30)
    archive = archive_of(settings)
    names = [s.name for s in archive.list_segments()]
    assert len(names) >= 5
    compared = 0
    for name in names:
        reference = workdir / "ref" / name
        if not reference.exists():
            continue  # before pg_receivewal's slot existed
        out = workdir / f"restored-{name}"
        result = wal_restore(config, name, out)
        assert result.returncode == 0, result.stderr.decode()
        assert out.read_bytes() == reference.read_bytes(), f"{name} differs from pg_receivewal's"
        in_pg_wal = pg.pg_wal_dir / name
        if in_pg_wal.exists():
            assert out.read_bytes() == in_pg_wal.read_bytes(), f"{name} differs from pg_wal"
        compared += 1
    assert compared >= 4
    if encrypted:
        raw = archive.segment_path(names[-1]).read_bytes()
        assert b"pgbench" not in raw  # nothing of the database in plaintext at rest
        assert archive.header(archive.segment_path(names[-1])).key_id == next(iter(keyring_files))


def test_restore_from_archive_reaches_last_commit(
    pg: Any,
    pg_factory: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    workdir: Path,
) -> None:
    config = write_config(
        workdir / "klio.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=keyring_files
    )
    settings = load(config)
    with receiver_inprocess(settings):
        pg.execute("CREATE TABLE marker (id int primary key, note text)")
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
        pg.pgbench_init(scale=3)
        pg.pgbench(clients=2, transactions=200)
        pg.execute("INSERT INTO marker SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
        expected = pg.sql("SELECT count(*), sum(abalance) FROM pgbench_accounts")[0]
        close_segment(pg, settings)
    restored = restored_server(
        workdir, backup, restore_command=f"{KLIO} --config {config} wal-restore %f %p"
    )
    restored.start()
    wait_until(lambda: restored.sql("SELECT NOT pg_is_in_recovery()")[0][0], 120, "promotion")
    assert restored.sql("SELECT count(*) FROM marker")[0][0] == 1000
    assert restored.sql("SELECT count(*), sum(abalance) FROM pgbench_accounts")[0] == expected


@pytest.mark.parametrize("synchronous", [False, True], ids=["async", "sync"])
def test_kill_9_resumes_without_gap_or_rewrite(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    workdir: Path,
    synchronous: bool,
) -> None:
    # synchronous: the streaming thread (pump), a .partial per commit, segment switches that do
    # not wait for the previous object
    config = write_config(
        workdir / "klio.yaml",
        pg=pg,
        nats_url=nats_server.url,
        tier1=tier1_dir,
        keys=keyring_files,
        status_interval=0.2,
        synchronous=synchronous,
    )
    settings = load(config)
    ref = start_pg_receivewal(pg, workdir / "ref")
    proc = ReceiverProcess(config, workdir / "receiver.log")
    proc.start()
    try:
        pg.pgbench_init(scale=3)
        wait_archived(settings, pg.current_lsn() - 1)
        load_run = threading.Thread(target=pg.pgbench, args=(2,), kwargs={"seconds": 4})
        load_run.start()
        wait_until(lambda: archive_end(settings) > 0, 30, "some WAL archived")
        proc.kill()
        slot_lsn = Lsn.parse(
            pg.sql("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'klio'")[0][0]
        )
        assert slot_lsn <= archive_end(settings), "the slot moved past what the archive holds"
        digests_before = {
            s.name: archive_of(settings)
            .header(archive_of(settings).segment_path(s.name))
            .plaintext_sha256
            for s in archive_of(settings).list_segments()
        }
        proc.start()
        load_run.join(120)
        end = pg.current_lsn()
        pg.switch_wal()
        wait_archived(settings, end)
    finally:
        proc.stop()
        ref.terminate()
        ref.wait(30)
    archive = archive_of(settings)
    segs = archive.list_segments()
    for s in segs:
        if s.name in digests_before:
            assert (
                archive.header(archive.segment_path(s.name)).plaintext_sha256
                == digests_before[s.name]
            )
    numbers = [s.segno for s in segs]
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), "gap in the archive"
    keyring = keyring_of(settings)
    for s in segs:
        reference = workdir / "ref" / s.name
        if reference.exists():
            assert archive.read(s.name, keyring) == reference.read_bytes(), s.name
    verify = wal_verify(config)
    assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()


def test_a_partial_left_beside_its_closed_segment_is_removed_on_start(
    pg: Any, nats_server: Any, tier1_dir: Path, keyring_files: dict[str, Path], workdir: Path
) -> None:
    # A crash after a segment's object is durable and before its .partial is removed leaves
    # both: the object is the truth, the .partial goes on the next start (and is never read).
    config = write_config(
        workdir / "k.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=keyring_files
    )
    settings = load(config)
    with receiver_inprocess(settings):
        close_segment(pg, settings)
    archive = archive_of(settings)
    closed = archive.list_segments()[-1]
    digest = archive.header(archive.segment_path(closed.name)).plaintext_sha256
    leftover = archive.open_dir / f"{closed.name}.partial"
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"whatever a crash left: it must not be read")
    with receiver_inprocess(settings):
        close_segment(pg, settings)
    assert not leftover.exists()
    assert archive.header(archive.segment_path(closed.name)).plaintext_sha256 == digest
    numbers = [s.segno for s in archive.list_segments()]
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), "gap in the archive"
    verify = wal_verify(config)
    assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()
