"""The WAL prefetch spool without servers: names, windows, cleanup, the lock, the rename path."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from klio_cli.main import fast_wal_restore, prefetch_option
from klio_common.errors import CorruptObject
from klio_common.pg.walname import WalSegment
from klio_dev.waiting import wait_until
from klio_restore import prefetch, spool
from klio_restore.spool import Owner

MIB = 1 << 20
SEG = "000000010000000000000003"


@pytest.fixture
def prefetcher_like() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line names the prefetcher module (as a live prefetcher's does)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", "klio_restore.prefetch"],
        stdin=subprocess.PIPE,
    )
    # Right after exec its command line reads empty for a moment (as a zombie's does).
    wait_until(lambda: spool.is_prefetcher(proc.pid), 30, "the stand-in's command line")
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(30)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def name(tli: int, segno: int, seg_size: int = MIB) -> str:
    return WalSegment(tli, segno, seg_size).name


# -- names ------------------------------------------------------------------------------------


def test_spool_sits_beside_the_destination() -> None:
    assert spool.spool_dir("pg_wal/RECOVERYXLOG") == "pg_wal/.klio-prefetch"
    assert spool.spool_dir("/data/pg_wal/RECOVERYXLOG") == "/data/pg_wal/.klio-prefetch"
    assert spool.spool_dir("RECOVERYXLOG") == "./.klio-prefetch"


def test_only_segment_names_use_the_spool() -> None:
    assert spool.is_segment_name(SEG)
    for other in (
        "00000002.history",
        f"{SEG}.partial",
        "00000001000000000000000a",
        SEG[:-1],
        "RECOVERYHISTORY",
        f"{SEG}0",
    ):
        assert not spool.is_segment_name(other), other


def test_lock_content_round_trips_and_garbage_is_no_owner() -> None:
    owner = Owner(1234, "a1b2c3", "/etc/klio.yaml", "main")
    back = Owner.decode(owner.encode())
    assert back is not None
    assert (back.pid, back.token, back.config, back.cluster) == (
        1234,
        "a1b2c3",
        "/etc/klio.yaml",
        "main",
    )
    assert owner.run_dir("/s") == "/s/run-a1b2c3"
    for garbage in (b"", b"12\n", b"x\ntok\nc\nd\n", b"12\ntok\nc\nd\nextra\n", b"12\nt/k\nc\nd\n"):
        assert Owner.decode(garbage) is None, garbage


def test_prefetch_option_is_taken_after_wal_restore() -> None:
    argv = ["--config", "k.yaml", "wal-restore", "--prefetch", "3", SEG, "dest"]
    depth, rest = prefetch_option(argv)
    assert (depth, rest) == (3, ["--config", "k.yaml", "wal-restore", SEG, "dest"])
    assert fast_wal_restore(rest) == ("k.yaml", None, SEG, "dest")
    assert prefetch_option(["wal-restore", "--prefetch=0", SEG, "d"]) == (
        0,
        ["wal-restore", SEG, "d"],
    )
    assert prefetch_option(["wal-restore", SEG, "d"]) == (None, ["wal-restore", SEG, "d"])
    for bad in (["wal-restore", "--prefetch", "-1", SEG, "d"], ["wal-restore", "--prefetch"]):
        assert prefetch_option(bad) == (None, bad)  # left for argparse to refuse
    assert prefetch_option(["wal", "status"]) == (None, ["wal", "status"])


# -- window and cleanup -----------------------------------------------------------------------


def test_window_follows_the_timeline_across_a_log_id() -> None:
    assert prefetch.window(name(1, 3), 3, MIB) == [name(1, 4), name(1, 5), name(1, 6)]
    last_of_id = name(1, 4095)  # 1 MiB segments: 4096 per log id
    assert last_of_id == "000000010000000000000FFF"
    assert prefetch.window(last_of_id, 2, MIB) == [
        "000000010000000100000000",
        "000000010000000100000001",
    ]
    assert prefetch.window("0000000200000000000000FF", 1, 16 * MIB) == ["000000020000000100000000"]
    assert prefetch.window(name(2, 7), 0, MIB) == []
    assert prefetch.window("00000002.history", 4, MIB) == []
    assert prefetch.window("000000010000000000001000", 4, MIB) == []  # impossible for 1 MiB


def test_cleanup_drops_what_is_behind_or_too_far_ahead() -> None:
    request = name(1, 10)
    files = [name(1, n) for n in (8, 9, 10, 11, 14, 15, 16)] + [name(2, 12), "junk"]
    doomed = prefetch.obsolete(files, request, 5, MIB)
    assert doomed == [name(1, 8), name(1, 9), name(1, 16), "junk"]
    # After a switch to timeline 2 the old timeline's segments ahead stay until passed.
    assert prefetch.obsolete([name(1, 11), name(2, 11)], name(2, 11), 5, MIB) == []
    assert prefetch.obsolete([name(1, 11)], "garbage", 5, MIB) == [name(1, 11)]


# -- the lock ---------------------------------------------------------------------------------


def test_lock_is_exclusive_while_its_owner_lives(
    tmp_path: Path, prefetcher_like: subprocess.Popen[bytes]
) -> None:
    first = Owner(prefetcher_like.pid, "aaaa", "c", "")
    assert prefetch.acquire(tmp_path, first)
    assert prefetch.owns(tmp_path, first)
    assert (tmp_path / "lock").stat().st_mode & 0o777 == 0o600
    second = Owner(os.getpid(), "bbbb", "c", "")
    assert not prefetch.acquire(tmp_path, second)
    assert prefetch.owns(tmp_path, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]  # no temp left
    live = spool.live_owner(str(tmp_path))
    assert live is not None and live.token == "aaaa"


def test_stale_lock_of_a_dead_pid_is_broken(tmp_path: Path) -> None:
    stale = Owner(dead_pid(), "dead", "c", "")
    (tmp_path / "lock").write_bytes(stale.encode())
    assert spool.read_owner(str(tmp_path)) is not None
    assert spool.live_owner(str(tmp_path)) is None
    mine = Owner(os.getpid(), "mine", "c", "")
    assert prefetch.acquire(tmp_path, mine)
    assert prefetch.owns(tmp_path, mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock"]


def test_reused_pid_and_garbage_locks_are_stale(tmp_path: Path) -> None:
    # Our own pid is alive but it is not a prefetcher (pytest's command line).
    assert not spool.is_prefetcher(os.getpid())
    (tmp_path / "lock").write_bytes(Owner(os.getpid(), "pytest", "c", "").encode())
    assert spool.live_owner(str(tmp_path)) is None
    assert prefetch.acquire(tmp_path, Owner(os.getpid(), "one", "c", ""))
    (tmp_path / "lock").write_bytes(b"half a lock")
    assert prefetch.acquire(tmp_path, Owner(os.getpid(), "two", "c", ""))
    assert prefetch.owns(tmp_path, Owner(os.getpid(), "two", "c", ""))


def test_an_owner_that_lost_the_lock_notices(tmp_path: Path) -> None:
    first = Owner(os.getpid(), "first", "c", "")
    assert prefetch.acquire(tmp_path, first)
    # It looks dead to the next one (alive=False), which takes over.
    assert prefetch.acquire(tmp_path, Owner(os.getpid(), "next", "c", ""), alive=lambda _: False)
    assert not prefetch.owns(tmp_path, first)


# -- the rename path --------------------------------------------------------------------------


def spool_with_owner(base: Path, pid: int, token: str = "t0k") -> tuple[Path, Path]:
    """A pg_wal directory whose spool is held by ``pid``; returns (pg_wal, run dir)."""
    pg_wal = base / "pg_wal"
    (pg_wal / spool.SPOOL_NAME / f"run-{token}").mkdir(parents=True)
    owner = Owner(pid, token, *spool.identity("k.yaml", None))
    (pg_wal / spool.SPOOL_NAME / "lock").write_bytes(owner.encode())
    return pg_wal, pg_wal / spool.SPOOL_NAME / f"run-{token}"


def test_a_spooled_segment_is_renamed_to_the_destination(
    tmp_path: Path, prefetcher_like: subprocess.Popen[bytes]
) -> None:
    pg_wal, run = spool_with_owner(tmp_path, prefetcher_like.pid)
    (run / SEG).write_bytes(b"segment 3")
    dest = pg_wal / "RECOVERYXLOG"
    assert spool.serve(SEG, str(dest), config="k.yaml", cluster=None)
    assert dest.read_bytes() == b"segment 3"
    assert not (run / SEG).exists()
    assert spool.read_request(str(pg_wal / spool.SPOOL_NAME))[0] == SEG  # type: ignore[index]
    assert f"hit {SEG}" in (pg_wal / spool.SPOOL_NAME / "log").read_text()


def test_the_spool_is_not_used_when_it_cannot_be_trusted(
    tmp_path: Path, prefetcher_like: subprocess.Popen[bytes]
) -> None:
    pg_wal, run = spool_with_owner(tmp_path, prefetcher_like.pid)
    (run / SEG).write_bytes(b"segment 3")
    dest = str(pg_wal / "RECOVERYXLOG")
    # Another configuration or cluster, prefetching off, not a segment: normal fetch.
    assert not spool.serve(SEG, dest, config="other.yaml", cluster=None)
    assert not spool.serve(SEG, dest, config="k.yaml", cluster="db2")
    assert not spool.serve(SEG, dest, config="k.yaml", cluster=None, depth=0)
    assert not spool.serve("00000002.history", dest, config="k.yaml", cluster=None)
    assert (run / SEG).exists()
    # The owner is gone: what its run left behind is never served.
    prefetcher_like.kill()
    prefetcher_like.wait(30)
    assert not spool.serve(SEG, dest, config="k.yaml", cluster=None)
    assert not Path(dest).exists()


def test_no_spool_means_a_normal_fetch_and_nothing_created(tmp_path: Path) -> None:
    dest = tmp_path / "RECOVERYXLOG"
    assert not spool.serve(SEG, str(dest), config="k.yaml", cluster=None)
    assert list(tmp_path.iterdir()) == []


def test_a_call_waits_for_the_segment_being_decoded(
    tmp_path: Path, prefetcher_like: subprocess.Popen[bytes]
) -> None:
    pg_wal, run = spool_with_owner(tmp_path, prefetcher_like.pid)
    (run / f"{SEG}.tmp").write_bytes(b"segment 3")
    spool_path = str(pg_wal / spool.SPOOL_NAME)

    def finish_when_asked() -> None:
        wait_until(lambda: (spool.read_request(spool_path) or ("",))[0] == SEG, 30, "request")
        (run / f"{SEG}.tmp").rename(run / SEG)

    helper = threading.Thread(target=finish_when_asked)
    helper.start()
    dest = pg_wal / "RECOVERYXLOG"
    try:
        assert spool.serve(SEG, str(dest), config="k.yaml", cluster=None, wait_limit=60)
    finally:
        helper.join(60)
    assert dest.read_bytes() == b"segment 3"


def test_a_call_gives_up_on_a_decode_that_does_not_finish(
    tmp_path: Path, prefetcher_like: subprocess.Popen[bytes]
) -> None:
    pg_wal, run = spool_with_owner(tmp_path, prefetcher_like.pid)
    (run / f"{SEG}.tmp").write_bytes(b"half")
    dest = pg_wal / "RECOVERYXLOG"
    assert not spool.serve(SEG, str(dest), config="k.yaml", cluster=None, wait_limit=0.05)
    assert not dest.exists()


# -- the prefetcher's loop, on an archive in memory -------------------------------------------


def test_prefetcher_fills_the_window_skips_bad_segments_and_stops_at_the_end(
    tmp_path: Path,
) -> None:
    archive = {name(1, n): bytes([n]) * MIB for n in range(1, 8)}

    def fetch(wanted: str) -> bytes | None:
        if wanted == name(1, 4):
            raise CorruptObject(f"segment {wanted} is corrupt: frame 0 failed authentication")
        return archive.get(wanted)

    owner = Owner(os.getpid(), "unit", "c", "")
    assert prefetch.acquire(tmp_path, owner)
    run = Path(owner.run_dir(str(tmp_path)))
    run.mkdir()
    spool.write_request(str(tmp_path), name(1, 1))
    worker = prefetch.Prefetcher(tmp_path, owner, fetch, seg_size=MIB, depth=4, idle=600)
    reasons: list[str] = []
    thread = threading.Thread(target=lambda: reasons.append(worker.run()))
    thread.start()
    try:
        wanted = {name(1, n) for n in (2, 3, 5)}
        wait_until(lambda: wanted <= {p.name for p in run.iterdir()}, 30, "segments 2, 3, 5")
        assert not (run / name(1, 4)).exists()  # corrupt: never spooled
        assert (run / name(1, 3)).read_bytes() == archive[name(1, 3)]
        assert (run / name(1, 3)).stat().st_mode & 0o777 == 0o600
        spool.write_request(str(tmp_path), name(1, 5))
        wait_until(lambda: not (run / name(1, 3)).exists(), 30, "segment 3 dropped")
        wait_until(lambda: (run / name(1, 7)).exists(), 30, "segment 7")
        spool.write_request(str(tmp_path), name(1, 7))  # 8 is not archived: the end
        thread.join(30)
    finally:
        spool.write_request(str(tmp_path), "stop")  # not a segment: ends the loop in any case
        thread.join(30)
    assert reasons == [f"{name(1, 8)} is not archived"]
    log = (tmp_path / "log").read_text()
    assert f"failed {name(1, 4)}: CorruptObject: segment {name(1, 4)} is corrupt" in log
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())


def test_prefetcher_stops_when_idle_or_when_it_loses_the_lock(tmp_path: Path) -> None:
    owner = Owner(os.getpid(), "idle", "c", "")
    assert prefetch.acquire(tmp_path, owner)
    Path(owner.run_dir(str(tmp_path))).mkdir()
    spool.write_request(str(tmp_path), name(1, 1))
    os.utime(tmp_path / "request", (1, 1))  # asked long ago
    archive = {name(1, 2): bytes(MIB)}
    worker = prefetch.Prefetcher(tmp_path, owner, archive.get, seg_size=MIB, depth=2, idle=5)
    assert worker.run() == "no request for 5 s"
    spool.write_request(str(tmp_path), name(1, 1))
    (tmp_path / "lock").unlink()
    assert worker.run() == "lock lost"
