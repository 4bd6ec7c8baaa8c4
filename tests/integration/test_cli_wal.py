"""The ``klio`` command's WAL read path and checks, as real processes on real files and servers."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.pg.walname import is_segment_name
from klio_dev import (
    PostgresServer,
    ServerError,
    run_as_postgres,
    wait_until,
)
from tests.fixtures.paths import KlioConfigWriter
from tests.integration.cli import (
    KLIO,
    SEG,
    SMALL,
    keyring,
    klio,
    open_archive,
    postgres_dir,
    read_config,
    store,
)

pytestmark = pytest.mark.integration


# -- wal-restore ------------------------------------------------------------------------------


def test_wal_restore_as_the_postgres_user(
    workdir: Path, tier1_dir: Path, keyring_files: dict[str, Path], klio_config: KlioConfigWriter
) -> None:
    archive = open_archive(tier1_dir, keyring_files)
    kr = keyring(keyring_files)
    segment = os.urandom(SEG)
    archive.store_segment(
        "000000010000000000000003", segment, codec=compression.get("zstd", 3), keyring=kr
    )
    history = b"1\t0/3000100\tno recovery target specified\n"
    archive.store_history(2, history, codec=compression.get("zstd", 3), keyring=kr)
    archive.store_segment(
        "000000010000000000000003.partial",
        segment[:1000] + bytes(SEG - 1000),
        codec=compression.get("none"),
        keyring=kr,
    )
    config = read_config(klio_config, tier1_dir, keyring_files)
    dest_dir = postgres_dir(workdir)

    dest = dest_dir / "RECOVERYXLOG"
    done = klio(
        "wal-restore", "000000010000000000000003", str(dest), config=config, user="postgres"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert dest.read_bytes() == segment
    assert dest.stat().st_mode & 0o777 == 0o600
    assert dest.stat().st_uid != 0  # written by the postgres user
    assert sorted(p.name for p in dest_dir.iterdir()) == ["RECOVERYXLOG"]  # no temp left

    # PostgreSQL reuses the name: a second fetch replaces the file.
    done = klio("wal-restore", "00000002.history", str(dest), config=config, user="postgres")
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == history

    done = klio(
        "wal-restore", "000000010000000000000003.partial", str(dest_dir / "p"), config=config
    )
    assert done.returncode == 0, done.stderr
    assert (dest_dir / "p").read_bytes()[:1000] == segment[:1000]


def test_wal_restore_of_a_missing_file_exits_1_and_creates_nothing(
    workdir: Path, tier1_dir: Path, keyring_files: dict[str, Path], klio_config: KlioConfigWriter
) -> None:
    open_archive(tier1_dir, keyring_files)
    config = read_config(klio_config, tier1_dir, keyring_files)
    dest_dir = postgres_dir(workdir)
    for name in ("000000010000000000000009", "00000005.history", "RECOVERYHISTORY"):
        done = klio("wal-restore", name, str(dest_dir / "x"), config=config, user="postgres")
        assert done.returncode == 1, (name, done.stderr)
        assert done.stdout == ""
        assert list(dest_dir.iterdir()) == []


def test_wal_restore_refuses_corruption_and_bad_keys_with_150(
    workdir: Path, tier1_dir: Path, keyring_files: dict[str, Path], klio_config: KlioConfigWriter
) -> None:
    archive = open_archive(tier1_dir, keyring_files)
    store(archive, keyring(keyring_files), 1, range(1, 3), SEG)
    dest_dir = postgres_dir(workdir)
    dest = dest_dir / "RECOVERYXLOG"
    good = read_config(klio_config, tier1_dir, keyring_files)

    # One flipped byte in the middle of the stored object.
    path = archive.segment_path("000000010000000000000002")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    done = klio("wal-restore", "000000010000000000000002", str(dest), config=good, user="postgres")
    assert done.returncode == 150
    assert done.stderr.startswith("klio: error: ")
    assert "000000010000000000000002" in done.stderr
    assert "HINT:" in done.stderr
    assert list(dest_dir.iterdir()) == []

    # The key that wrote the segment is not configured.
    only_k2 = read_config(
        klio_config, tier1_dir, {"k2": keyring_files["k2"]}, path=workdir / "k2.yaml"
    )
    done = klio("wal-restore", "000000010000000000000001", str(dest), config=only_k2)
    assert done.returncode == 150
    assert "'k1'" in done.stderr

    # A different key under the same id.
    wrong = workdir / "keys" / "wrong"
    wrong.write_bytes(os.urandom(32))
    wrong_k1 = read_config(klio_config, tier1_dir, {"k1": wrong}, path=workdir / "wrong.yaml")
    done = klio("wal-restore", "000000010000000000000001", str(dest), config=wrong_k1)
    assert done.returncode == 150
    assert list(dest_dir.iterdir()) == []

    # An unreadable configuration, a missing one, and a cluster without an archive.
    bad = workdir / "bad.yaml"
    bad.write_text("tier1: {path: 5\n")
    for args in (["--config", str(bad)], ["--config", str(workdir / "none.yaml")]):
        done = klio(*args, "wal-restore", "000000010000000000000001", str(dest))
        assert done.returncode == 150, done.stderr
        assert done.stderr.startswith("klio: error: ")
    elsewhere = read_config(klio_config, workdir, keyring_files, path=workdir / "elsewhere.yaml")
    done = klio("wal-restore", "000000010000000000000001", str(dest), config=elsewhere)
    assert done.returncode == 150
    assert "no WAL archive" in done.stderr


# -- wal verify -------------------------------------------------------------------------------


def test_wal_verify_clean_archive_across_a_timeline_switch(
    tier1_dir: Path, keyring_files: dict[str, Path], klio_config: KlioConfigWriter
) -> None:
    archive = open_archive(tier1_dir, keyring_files, SMALL)
    kr = keyring(keyring_files)
    store(archive, kr, 1, range(2, 8), SMALL)
    archive.store_history(2, b"1\t0/700080\tx\n", codec=compression.get("zstd"), keyring=kr)
    store(archive, kr, 2, range(7, 10), SMALL)
    config = read_config(klio_config, tier1_dir, keyring_files)

    done = klio("wal", "verify", "--json", config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["target_timeline"] == 2
    assert report["first_segment"] == "000000010000000000000002"
    assert report["last_segment"] == "000000020000000000000009"
    assert report["off_path"] == ["000000010000000000000007"]
    assert report["decoded"] == 10
    assert klio("wal", "verify", config=config).stdout.rstrip().endswith("result: ok")


def test_wal_verify_reports_gaps_missing_history_and_damage(
    tier1_dir: Path, keyring_files: dict[str, Path], klio_config: KlioConfigWriter
) -> None:
    archive = open_archive(tier1_dir, keyring_files, SMALL)
    kr = keyring(keyring_files)
    store(archive, kr, 1, range(1, 4), SMALL)
    store(archive, kr, 1, range(6, 8), SMALL)  # 4 and 5 are missing
    store(archive, kr, 3, range(8, 10), SMALL)  # 00000003.history is missing
    damaged = archive.segment_path("000000010000000000000002")
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    config = read_config(klio_config, tier1_dir, keyring_files)

    done = klio("wal", "verify", "--json", config=config)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert report["gaps"] == [
        {
            "timeline": 1,
            "first_segment": "000000010000000000000004",
            "last_segment": "000000010000000000000005",
            "count": 2,
            "start_lsn": "0/400000",
            "end_lsn": "0/600000",
        }
    ]
    assert report["missing_histories"] == ["00000003.history"]
    assert [d["name"] for d in report["damaged"]] == ["000000010000000000000002"]
    assert report["damaged"][0]["reason"]

    text = klio("wal", "verify", config=config)
    assert text.returncode == 1
    assert "gap on timeline 1: 000000010000000000000004 .. 000000010000000000000005" in text.stdout
    assert "missing history file: 00000003.history" in text.stdout
    assert "damaged: 000000010000000000000002" in text.stdout

    # --quick reads names only: the damage goes unnoticed, the gaps do not.
    quick = json.loads(klio("wal", "verify", "--json", "--quick", config=config).stdout)
    assert quick["damaged"] == [] and len(quick["gaps"]) == 1


# -- wal status -------------------------------------------------------------------------------


def test_wal_status_reports_the_receiver_and_the_archive(
    tier1_dir: Path, keyring_files: dict[str, Path], klio_config: KlioConfigWriter
) -> None:
    archive = open_archive(tier1_dir, keyring_files, SMALL)
    store(archive, keyring(keyring_files), 1, range(1, 4), SMALL)
    status = {
        "state": "streaming",
        "slot": "klio",
        "server_timeline": 1,
        "received_lsn": "0/4000A8",
        "flushed_lsn": "0/400000",
        "server_lsn": "0/4000A8",
        "lag_bytes": 168,
        "lag_seconds": 0.2,
        "last_closed_segment": "000000010000000000000003",
        "segments_closed": 3,
        "last_error": None,
        "updated_at": time.time(),
        "synchronous": False,
    }
    archive.write_status(status)
    config = read_config(klio_config, tier1_dir, keyring_files)

    done = klio("wal", "status", "--json", config=config)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["state"] == "streaming"
    assert doc["stale"] is False
    assert doc["last_closed_segment"] == "000000010000000000000003"
    assert doc["flushed_lsn"] == "0/400000"
    assert doc["archive"]["segments"] == 3
    assert doc["archive"]["timelines"] == [1]
    assert doc["archive"]["size_bytes"] > 0
    text = klio("wal", "status", config=config).stdout
    assert "streaming (updated" in text
    assert "000000010000000000000003" in text

    archive.write_status({**status, "synchronous": True, "turn": "native"})
    assert json.loads(klio("wal", "status", "--json", config=config).stdout)["turn"] == "native"
    assert "native turn" in klio("wal", "status", config=config).stdout

    archive.write_status({**status, "updated_at": time.time() - 45})
    doc = json.loads(klio("wal", "status", "--json", config=config).stdout)
    assert doc["stale"] is True
    assert "stale" in klio("wal", "status", config=config).stdout


# -- PostgreSQL itself as the client of wal-restore ---------------------------------------------


def prepare_recovery(
    pg: PostgresServer,
    workdir: Path,
    tier1: Path,
    keys: Mapping[str, Path],
    klio_config: KlioConfigWriter,
) -> tuple[PostgresServer, WalArchive, str]:
    """A base backup of ``pg`` set up to recover with ``klio wal-restore``, and WAL archived."""
    pg.execute("CREATE TABLE t (i int)")
    pg.execute("INSERT INTO t SELECT generate_series(1, 1000)")
    config = read_config(klio_config, tier1, keys)
    restored = PostgresServer(
        workdir,
        name="restored",
        settings={
            "restore_command": f"{KLIO} --config {config} wal-restore %f %p",
            "recovery_target_action": "promote",
        },
    )
    restored._prepare_root()
    source = ["-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres"]
    backup = ["pg_basebackup", "-D", str(restored.data_dir), "-X", "none", "-c", "fast"]
    run_as_postgres([*backup, "--no-sync", *source])
    restored._write_config()
    run_as_postgres(["touch", str(restored.data_dir / "recovery.signal")])
    pg.execute("INSERT INTO t SELECT generate_series(1001, 3000)")
    last = pg.switch_wal()

    archive = WalArchive(tier1, "main")
    archive.ensure_identity(pg.system_identifier(), SEG, 150000, int(time.time()))
    kr = keyring(keys)
    for path in sorted(pg.pg_wal_dir.iterdir()):
        # Later names in pg_wal are recycled files waiting for reuse, not WAL.
        if is_segment_name(path.name) and path.name <= last:
            archive.store_segment(
                path.name, path.read_bytes(), codec=compression.get("zstd"), keyring=kr
            )
    return restored, archive, last


def test_postgres_recovers_to_the_end_of_the_archive(
    pg: PostgresServer,
    workdir: Path,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    restored, _, _ = prepare_recovery(pg, workdir, tier1_dir, keyring_files, klio_config)
    try:
        restored.start()
        # Exit status 1 for the segment after the last one ends recovery: promotion follows.
        wait_until(lambda: restored.sql("SELECT NOT pg_is_in_recovery()")[0][0], 60, "promotion")
        assert restored.sql("SELECT count(*) FROM t") == [(3000,)]
    finally:
        restored.stop("immediate")


def test_postgres_stops_recovery_on_a_corrupt_segment(
    pg: PostgresServer,
    workdir: Path,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    restored, archive, last = prepare_recovery(pg, workdir, tier1_dir, keyring_files, klio_config)
    path = archive.segment_path(last)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    try:
        with pytest.raises(ServerError):
            restored.start()
        log = restored.log_path.read_text()
        assert f'could not restore file "{last}" from archive' in log
        assert "exit code 150" in log
        assert "database system is ready to accept connections" not in log
        assert not restored.running
    finally:
        restored.stop("immediate")
