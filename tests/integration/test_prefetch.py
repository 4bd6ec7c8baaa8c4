"""The WAL prefetch spool with real processes: PostgreSQL recovery, corruption, timelines, exit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.pg.walname import WalSegment
from klio_dev import wait_until
from klio_restore import prefetch, spool
from tests.fixtures.paths import KlioConfigWriter, Volume
from tests.wal_receiver.helpers import (
    close_segment,
    load,
    receiver_inprocess,
    restored_server,
    write_config,
)
from tests.wal_receiver.helpers import postgres_dir as owned_dir

pytestmark = pytest.mark.integration

KLIO = Path(sys.executable).with_name("klio")
MIB = 1 << 20


def klio(
    *args: str, config: Path, user: str | None = "postgres"
) -> subprocess.CompletedProcess[str]:
    argv = [str(KLIO), "--config", str(config), *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)


def prefetchers(root: Path) -> list[int]:
    """Pids of live prefetchers holding a spool lock anywhere below ``root``."""
    found = []
    # os.walk skips a directory that vanishes under it (a prefetcher removing its run
    # directory), where Path.glob("**/...") raised FileNotFoundError
    for directory, subdirectories, files in os.walk(root):
        if Path(directory).name != ".klio-prefetch":
            continue
        subdirectories.clear()  # the spool's own run directories come and go
        owner = spool.read_owner(directory) if "lock" in files else None
        if owner is not None and spool.is_prefetcher(owner.pid):
            found.append(owner.pid)
    return found


@pytest.fixture
def no_prefetcher_left(workdir: Path) -> Iterator[None]:
    """Stop any prefetcher the test's own ``klio`` calls left running (they exit by themselves)."""
    yield
    for pid in prefetchers(workdir):
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not prefetchers(workdir), 60, "prefetchers to stop")


def segment(tli: int, segno: int) -> str:
    return WalSegment(tli, segno, MIB).name


def body(tli: int, segno: int) -> bytes:
    return (tli.to_bytes(4, "big") + segno.to_bytes(4, "big")) * (MIB // 8)


def small_archive(tier1: Path, keys: dict[str, Path], segs: dict[int, range]) -> WalArchive:
    """An archive of 1 MiB segments: ``{timeline: segment numbers}``, zstd + AES-256-GCM."""
    archive = WalArchive(tier1, "main")
    archive.ensure_identity(7000000000000000002, MIB, 150000, int(time.time()))
    keyring = KeyRing.load("k1", dict(keys))
    codec = compression.get("zstd", 3)
    for tli, segnos in segs.items():
        for segno in segnos:
            archive.store_segment(
                segment(tli, segno), body(tli, segno), codec=codec, keyring=keyring
            )
    return archive


def read_config(klio_config: KlioConfigWriter, tier1: Path, keys: dict[str, Path]) -> Path:
    cluster = {"name": "main", "conninfo": "host=127.0.0.1 port=1 user=klio"}
    return klio_config(tier1=tier1, keys=keys, extra={"clusters": [cluster]})


def spooled(pg_wal: Path) -> set[str]:
    return {p.name for p in pg_wal.glob(".klio-prefetch/run-*/*")}


def log_lines(pg_wal: Path, word: str) -> list[str]:
    path = pg_wal / ".klio-prefetch" / "log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in lines if line.split(" ", 3)[2] == word]


# -- a real recovery ------------------------------------------------------------------------


def test_recovery_with_prefetch_reaches_the_same_data_through_the_spool(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    workdir: Path,
    no_prefetcher_left: None,
) -> None:
    config = write_config(
        workdir / "klio.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=keyring_files
    )
    settings = load(config)
    with receiver_inprocess(settings):
        pg.execute("CREATE TABLE marker (id int primary key, note text)")
        backup = owned_dir(workdir / "backup")
        pg.run_as_postgres(
            [
                *("pg_basebackup", "-X", "none", "-c", "fast"),
                *("-D", str(backup), "-d", pg.superuser_conninfo()),
            ]
        )
        pg.pgbench_init(scale=8)
        pg.pgbench(clients=2, transactions=200)
        pg.execute("INSERT INTO marker SELECT g, 'row ' || g FROM generate_series(1, 500) g")
        query = "SELECT count(*), sum(abalance) FROM pgbench_accounts"
        expected = pg.sql(query)[0]
        close_segment(pg, settings)
    copy = workdir / "backup-copy"
    subprocess.run(["cp", "-a", str(backup), str(copy)], check=True)
    command = f"{KLIO} --config {config} wal-restore"
    with_spool = restored_server(workdir, backup, restore_command=f"{command} %f %p")
    without = restored_server(
        workdir, copy, restore_command=f"{command} --prefetch 0 %f %p", name="plain"
    )
    try:
        for server in (with_spool, without):
            server.start()
            promoted = "SELECT NOT pg_is_in_recovery()"
            wait_until(lambda: server.sql(promoted)[0][0], 300, "promotion")  # noqa: B023
            assert server.sql("SELECT count(*) FROM marker")[0][0] == 500
            assert server.sql(query)[0] == expected
    finally:
        with_spool.stop()
        without.stop()
    pg_wal = with_spool.data_dir / "pg_wal"
    hits, misses = log_lines(pg_wal, "hit"), log_lines(pg_wal, "miss")
    assert len(hits) + len(misses) >= 8, (hits, misses)  # one line per segment restored
    assert len(hits) >= 3, (hits, misses)
    assert not (without.data_dir / "pg_wal" / ".klio-prefetch").exists()
    # The prefetcher stops by itself at the end of the archive and leaves no segment behind.
    wait_until(lambda: not prefetchers(workdir), 60, "the prefetcher to exit")
    assert not spooled(pg_wal)
    assert log_lines(pg_wal, "prefetcher")
    spool_dir = pg_wal / ".klio-prefetch"
    assert spool_dir.stat().st_mode & 0o777 == 0o700
    assert (spool_dir / "log").stat().st_mode & 0o777 == 0o600
    assert spool_dir.stat().st_uid == with_spool.data_dir.stat().st_uid  # the server's user


# -- never wrong data ---------------------------------------------------------------------------


def test_a_corrupt_segment_is_never_spooled_and_still_fails_with_150(
    workdir: Path,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    no_prefetcher_left: None,
) -> None:
    archive = small_archive(tier1_dir, keyring_files, {1: range(1, 7)})
    bad = archive.segment_path(segment(1, 4))
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    config = read_config(klio_config, tier1_dir, keyring_files)
    pg_wal = owned_dir(workdir / "pg_wal")

    done = klio("wal-restore", segment(1, 1), str(pg_wal / "got-1"), config=config)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: log_lines(pg_wal, "failed"), 60, "the prefetcher to try segment 4")
    wait_until(lambda: {segment(1, n) for n in (2, 3, 5, 6)} <= spooled(pg_wal), 60, "2, 3, 5, 6")
    assert segment(1, 4) not in spooled(pg_wal)
    assert segment(1, 4) in log_lines(pg_wal, "failed")[0]

    for segno in (2, 3, 4, 5, 6):
        dest = pg_wal / f"got-{segno}"
        done = klio("wal-restore", segment(1, segno), str(dest), config=config)
        if segno == 4:
            assert done.returncode == 150
            assert segment(1, 4) in done.stderr and "HINT:" in done.stderr
            assert not dest.exists()
        else:
            assert done.returncode == 0, done.stderr
            assert dest.read_bytes() == body(1, segno)
            assert dest.stat().st_mode & 0o777 == 0o600
    hits = {line.rsplit(" ", 1)[1] for line in log_lines(pg_wal, "hit")}
    assert hits == {segment(1, n) for n in (2, 3, 5, 6)}
    # Segment 7 is not archived: the prefetcher stops after the request for 6.
    wait_until(lambda: not prefetchers(workdir), 60, "the prefetcher to exit")
    assert not list(pg_wal.glob(".klio-prefetch/run-*"))
    assert not (pg_wal / ".klio-prefetch" / "lock").exists()


def test_after_a_timeline_switch_the_new_timeline_is_fetched_not_the_spool(
    workdir: Path,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    no_prefetcher_left: None,
) -> None:
    small_archive(tier1_dir, keyring_files, {1: range(1, 8), 2: range(4, 9)})
    config = read_config(klio_config, tier1_dir, keyring_files)
    pg_wal = owned_dir(workdir / "pg_wal")

    assert klio("wal-restore", segment(1, 2), str(pg_wal / "a"), config=config).returncode == 0
    wait_until(lambda: {segment(1, n) for n in (3, 4, 5)} <= spooled(pg_wal), 60, "timeline 1")
    done = klio("wal-restore", segment(1, 3), str(pg_wal / "b"), config=config)
    assert done.returncode == 0, done.stderr
    assert (pg_wal / "b").read_bytes() == body(1, 3)
    # PostgreSQL switches to timeline 2 at segment 4: same segment numbers, other contents.
    for segno in (4, 5, 6):
        dest = pg_wal / f"tli2-{segno}"
        done = klio("wal-restore", segment(2, segno), str(dest), config=config)
        assert done.returncode == 0, done.stderr
        assert dest.read_bytes() == body(2, segno)
    assert segment(2, 4) in log_lines(pg_wal, "miss")[-1]
    assert log_lines(pg_wal, "hit")


def test_the_prefetcher_exits_when_idle_and_one_runs_at_a_time(
    workdir: Path,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    no_prefetcher_left: None,
) -> None:
    small_archive(tier1_dir, keyring_files, {1: range(1, 20)})
    config = read_config(klio_config, tier1_dir, keyring_files)
    spool_dir = workdir / "pg_wal" / ".klio-prefetch"
    spool_dir.parent.mkdir()

    def start(idle: float) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "klio_restore.prefetch", "--spool", str(spool_dir)]
        argv += ["--request", segment(1, 1), "--depth", "3", "--config", str(config)]
        return subprocess.Popen([*argv, "--idle", str(idle)])

    first = start(600)
    wait_until(lambda: len(spooled(spool_dir.parent)) == 3, 60, "three segments spooled")
    second = start(600)
    assert second.wait(60) == 0  # the lock is taken: it leaves at once
    assert prefetchers(workdir) == [first.pid]

    first.kill()  # no cleanup: a stale lock and a run directory are left
    first.wait(30)
    stale_run = next(spool_dir.glob("run-*"))
    third = start(0.5)
    assert third.wait(60) == 0  # breaks the lock, works, and goes when nobody asks
    assert not stale_run.exists()
    assert not (spool_dir / "lock").exists()
    assert not list(spool_dir.glob("run-*"))
    exits = [line for line in (spool_dir / "log").read_text().splitlines() if "exited" in line]
    assert exits and exits[-1].endswith("no request for 0.5 s")


def test_the_spool_leaves_room_on_a_small_pg_wal_volume(
    workdir: Path,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    small_volume: Callable[..., Volume],
    no_prefetcher_left: None,
) -> None:
    small_archive(tier1_dir, keyring_files, {1: range(1, 13)})
    config = read_config(klio_config, tier1_dir, keyring_files)
    pg_wal = small_volume(8, "pg_wal").path  # 8 segments of 1 MiB; the spool's depth is 8 too
    shutil.chown(pg_wal, "postgres", "postgres")
    pg_wal.chmod(0o700)
    reserve = prefetch.RESERVE_SEGMENTS * MIB

    def free() -> int:
        st = os.statvfs(pg_wal)
        return st.f_bavail * st.f_frsize

    dest = pg_wal / "RECOVERYXLOG"  # as PostgreSQL restores: one name, replaced each time
    assert klio("wal-restore", segment(1, 1), str(dest), config=config).returncode == 0
    wait_until(lambda: log_lines(pg_wal, "paused"), 60, "the spool to stop short of the reserve")
    assert 1 <= len(spooled(pg_wal)) < 8
    assert free() >= reserve
    for segno in range(2, 13):
        done = klio("wal-restore", segment(1, segno), str(dest), config=config)
        assert done.returncode == 0, done.stderr
        assert dest.read_bytes() == body(1, segno)
        assert free() >= reserve - MIB  # at most one segment in flight beyond the check
    assert log_lines(pg_wal, "hit")  # the spool still served, within its room
