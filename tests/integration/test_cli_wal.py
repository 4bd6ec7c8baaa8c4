"""The ``klio`` command's WAL read path and checks, as real processes on real files and servers."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from klio_cli.events import tail
from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.events import WalSegmentClosed, codec, now
from klio_common.pg.walname import WalSegment, is_segment_name
from klio_common.runtime.bus import Bus
from klio_common.runtime.settings import Settings
from klio_dev import (
    NatsServer,
    PostgresServer,
    ServerError,
    run_as_postgres,
    wait_until,
    wait_until_async,
)
from tests.fixtures.paths import KlioConfigWriter

pytestmark = pytest.mark.integration

KLIO = Path(sys.executable).with_name("klio")
SEG = 16 << 20
SMALL = 1 << 20  # verify tests use 1 MiB segments: same logic, less to encode


def klio(
    *args: str, config: Path | None = None, user: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``klio`` with a clean environment (no KLIO_CONFIG leaking in)."""
    argv = [str(KLIO), *(["--config", str(config)] if config else []), *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def open_archive(tier1: Path, keys: Mapping[str, Path], seg_size: int = SEG) -> WalArchive:
    archive = WalArchive(tier1, "main")
    archive.ensure_identity(7000000000000000001, seg_size, 150000, int(time.time()))
    return archive


def keyring(keys: Mapping[str, Path], active: str = "k1") -> KeyRing:
    return KeyRing.load(active, dict(keys))


def store(archive: WalArchive, kr: KeyRing, tli: int, segnos: range, size: int) -> None:
    codec_ = compression.get("zstd", 3)
    for segno in segnos:
        body = segno.to_bytes(8, "big") * (size // 8)
        archive.store_segment(WalSegment(tli, segno, size).name, body, codec=codec_, keyring=kr)


def read_config(
    klio_config: KlioConfigWriter,
    tier1: Path,
    keys: Mapping[str, Path],
    path: Path | None = None,
) -> Path:
    """A configuration for the read path only: Tier 1, keys and the cluster ``main``."""
    cluster = {"name": "main", "conninfo": "host=127.0.0.1 port=1 user=klio"}
    return klio_config(tier1=tier1, keys=keys, extra={"clusters": [cluster]}, path=path)


def postgres_dir(workdir: Path) -> Path:
    """A directory the postgres user may write into (like pg_wal)."""
    path = workdir / "pg_wal"
    path.mkdir()
    subprocess.run(["chown", "postgres:postgres", str(path)], check=True)
    return path


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

    archive.write_status({**status, "updated_at": time.time() - 45})
    doc = json.loads(klio("wal", "status", "--json", config=config).stdout)
    assert doc["stale"] is True
    assert "stale" in klio("wal", "status", config=config).stdout


# -- check ------------------------------------------------------------------------------------


async def test_check_against_real_servers(
    pg: PostgresServer,
    nats_server: NatsServer,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, keys=keyring_files)
    settings = Settings.load(config, {})
    bus = await Bus.connect(settings.nats, name="test")
    await bus.ensure_stream()
    await bus.close()

    done = await asyncio.to_thread(klio, "check", "--json", config=config)
    results = {r["name"]: r for r in json.loads(done.stdout)}
    assert done.returncode == 0, done.stdout
    for name in (
        "config",
        "keys",
        "nats",
        "stream",
        "main/postgres",
        "main/version",
        "main/wal_level",
        "main/replication role",
        "main/system identifier",
        "main/tier1",
    ):
        assert results[name]["status"] == "ok", results[name]
    assert results["main/slot"]["status"] == "warn"  # the receiver creates it
    assert "tier2" not in results

    pg.execute("SELECT pg_create_physical_replication_slot('klio')")
    archive = WalArchive(tier1_dir, "main")
    archive.ensure_identity(pg.system_identifier(), SEG, 150000, int(time.time()))
    done = await asyncio.to_thread(klio, "check", config=config)
    assert done.returncode == 0, done.stdout
    assert "ok main/slot: physical slot 'klio'" in done.stdout
    assert f"ok main/system identifier: {pg.system_identifier()} matches" in done.stdout


async def test_check_fails_fast_with_reasons(
    pg: PostgresServer,
    nats_server: NatsServer,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, keys=keyring_files)
    WalArchive(tier1_dir, "main").ensure_identity(42, SEG, 150000, int(time.time()))
    pg.execute("ALTER ROLE klio NOREPLICATION")
    done = await asyncio.to_thread(klio, "check", config=config)
    assert done.returncode == 1
    assert "FAIL stream: stream KLIO does not exist" in done.stdout
    assert "FAIL main/replication role:" in done.stdout

    pg.execute("ALTER ROLE klio REPLICATION")
    done = await asyncio.to_thread(klio, "check", config=config)
    assert "FAIL main/system identifier:" in done.stdout
    assert "belongs to system 42" in done.stdout

    nats_server.stop()
    pg.stop()
    done = await asyncio.to_thread(klio, "check", config=config)
    assert done.returncode == 1
    assert "FAIL nats: cannot connect to NATS" in done.stdout
    assert "FAIL main/postgres: " in done.stdout
    assert "ok main/tier1:" in done.stdout

    broken = klio_config(
        pg=pg,
        tier1=tier1_dir,
        extra={"compression": {"level": 99}},
        path=tier1_dir.parent / "broken.yaml",
    )
    done = await asyncio.to_thread(klio, "check", config=broken)
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL config: invalid configuration")


# -- events tail ------------------------------------------------------------------------------


async def test_events_tail_prints_events_from_the_start_and_live(
    nats_server: NatsServer, klio_config: KlioConfigWriter, tier1_dir: Path
) -> None:
    settings = Settings.load(klio_config(nats=nats_server, tier1=tier1_dir), {})
    bus = await Bus.connect(settings.nats, name="test")
    await bus.ensure_stream()

    def event(cluster: str, segment: str) -> WalSegmentClosed:
        return WalSegmentClosed(
            event_id=codec.event_id_for(cluster, segment),
            occurred_at=now(),
            cluster=cluster,
            system_id="1",
            segment=segment,
            timeline=1,
            start_lsn="0/1000000",
            end_lsn="0/2000000",
            size=SEG,
            stored_size=100,
            sha256="0" * 64,
            key_id=None,
            compression="zstd",
            path=f"wal/0000000100000000/{segment}",
        )

    await bus.publish_event(event("main", "000000010000000000000001"))
    await bus.publish_event(event("other", "000000010000000000000002"))
    out = io.StringIO()
    stop = asyncio.Event()
    with redirect_stdout(out):
        task = asyncio.create_task(
            tail(settings, "klio.main.>", as_json=True, from_start=True, stop=stop)
        )
        await wait_until_async(
            lambda: "000000010000000000000001" in out.getvalue(), 10, "the first event"
        )
        await bus.publish_event(event("main", "000000010000000000000003"))
        await wait_until_async(
            lambda: "000000010000000000000003" in out.getvalue(), 10, "the live event"
        )
        stop.set()
        await task
    await bus.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"]["segment"] for line in lines] == [
        "000000010000000000000001",
        "000000010000000000000003",
    ]
    assert lines[0]["subject"] == "klio.main.wal.segment.closed"


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
