"""The synchronous standby's native turn (`_turn.c`) against its Python loop, on a real stream.

Both loops, with encryption or without, must leave the same archive: every closed segment
byte-identical to ``pg_wal``, the open ``.partial`` holding exactly the WAL the primary has
flushed, the slot never ahead of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from klio_common.partial import read_partial
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_common.runtime import metrics
from klio_dev.waiting import wait_until
from klio_wal_receiver import native
from tests.wal_receiver.helpers import (
    archive_of,
    keyring_of,
    load,
    receiver_inprocess,
    synchronous_standby,
    wait_archived,
    wal_restore,
    wal_verify,
    write_config,
)


def test_the_native_turn_is_built() -> None:
    # this machine (and CI's) has gcc, the Python headers and OpenSSL's: the package must have
    # built its native turn, or every synchronous-standby test below would test only Python
    assert native.built()


@pytest.mark.parametrize(
    ("turn", "encrypted"),
    [("native", True), ("python", True), ("native", False)],
    ids=["native", "python", "native-unencrypted"],
)
def test_synchronous_standby_archive_is_exact(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    turn: str,
    encrypted: bool,
) -> None:
    monkeypatch.setenv(native.ENV, "1" if turn == "native" else "0")
    config = write_config(
        workdir / "klio.yaml",
        pg=pg,
        nats_url=nats_server.url,
        tier1=tier1_dir,
        keys=keyring_files if encrypted else None,
        synchronous=True,
    )
    settings = load(config)
    archive = archive_of(settings)
    pg.pgbench_init(scale=1)
    flushes_before = _native_flushes()
    with receiver_inprocess(settings):
        with synchronous_standby(pg):
            # every commit waits for a flush: thousands of turns, and segment switches (the
            # bulk load's 40 MB) in the middle of a turn
            pg.pgbench(clients=4, transactions=500)
            pg.execute(
                "CREATE TABLE filler AS SELECT g, repeat('x', 500) FROM generate_series(1, 60000) g"
            )
            pg.pgbench(clients=4, transactions=1000)
            pg.execute("CREATE TABLE marker AS SELECT 1 AS v")
            committed = pg.current_lsn()  # returned, so the archive holds it already
        wait_until(lambda: (archive.read_status() or {}).get("turn") == turn, 10, "the status")
        slot = pg.sql("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'klio'")
        wait_archived(settings, committed, timeout=1)
    keyring = keyring_of(settings)
    segs = archive.list_segments()
    assert len(segs) >= 2, "the load should cross segment switches"
    numbers = [s.segno for s in segs]
    assert numbers == list(range(numbers[0], numbers[-1] + 1)), "gap in the archive"
    for s in segs:
        in_pg_wal = pg.pg_wal_dir / s.name
        if in_pg_wal.exists():
            out = workdir / f"restored-{s.name}"
            result = wal_restore(config, s.name, out)
            assert result.returncode == 0, result.stderr.decode()
            assert out.read_bytes() == in_pg_wal.read_bytes(), s.name
    # the open segment: its .partial holds the primary's WAL up to the last commit, exactly
    seg_size = archive.segment_size()
    open_seg = WalSegment.from_lsn(1, committed, seg_size)
    partial = archive.open_dir / f"{open_seg.name}.partial"
    _, plain, valid_end = read_partial(partial, keyring, source=str(partial))
    assert open_seg.start_lsn + valid_end >= committed
    assert bytes(plain[:valid_end]) == (pg.pg_wal_dir / open_seg.name).read_bytes()[:valid_end]
    assert Lsn.parse(slot[0][0]) <= open_seg.start_lsn + valid_end, "the slot is ahead"
    flushes = _native_flushes() - flushes_before
    if turn == "native":
        assert flushes >= 1500, "the native turn made few of the flushes"
    else:
        assert flushes == 0
    verify = wal_verify(config)
    assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()


def _native_flushes() -> float:
    value = metrics.registry().get_sample_value(
        "klio_wal_native_flushes_total", {"cluster": "main"}
    )
    return value or 0.0
