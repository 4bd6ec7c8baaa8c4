"""A full Tier-1 volume, for real: a small tmpfs fills up under the receiver, then grows.

The receiver must say what is wrong (on /readyz, with a hint), never report a flush position
past what the volume holds (the slot keeps the primary's WAL meanwhile), and, once the volume
has room again, carry on by itself: no gap, no segment with different bytes, every closed
segment announced.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from klio_dev.ports import free_port
from klio_dev.waiting import wait_until
from tests.fixtures.paths import Volume
from tests.wal_receiver.helpers import (
    announced,
    archive_end,
    archive_of,
    close_segment,
    load,
    random_row,
    receiver_inprocess,
    wait_closed,
    wal_restore,
    wal_verify,
    write_config,
)

VOLUME_MB = 48  # a synchronous standby zero-fills 17 MB per .partial, the open and the next one
FILL_MB = 4  # random bytes per INSERT: WAL that compresses to nothing less
MAX_FILLS = 40


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except urllib.error.URLError:
        return 0, ""


def _slot_flush(pg: Any) -> int:
    """What the primary holds as durable on the standby: the slot's restart LSN."""
    rows = pg.sql(
        "SELECT (restart_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots"
        " WHERE slot_name = 'klio'"
    )
    return int(rows[0][0]) if rows and rows[0][0] is not None else 0


@pytest.mark.parametrize("synchronous", [False, True], ids=["async", "sync"])
def test_full_volume_is_reported_and_archiving_resumes_when_it_grows(
    pg: Any,
    nats_server: Any,
    small_volume: Callable[..., Volume],
    keyring_files: dict[str, Path],
    workdir: Path,
    synchronous: bool,
) -> None:
    volume = small_volume(VOLUME_MB)
    port = free_port()
    config = write_config(
        workdir / "k.yaml",
        pg=pg,
        nats_url=nats_server.url,
        tier1=volume.path,
        keys=keyring_files,
        synchronous=synchronous,
        http_port=port,
    )
    settings = load(config)
    pg.execute("CREATE TABLE filler (b bytea)")
    fill = random_row("filler", FILL_MB)
    with receiver_inprocess(settings):
        wait_until(lambda: _readyz(port)[0] == 200, 60, "/readyz to answer 200")
        said: list[str] = []

        def full_reported() -> bool:
            code, body = _readyz(port)
            said.append(body)
            return code == 503 and "no space left on device" in body

        for _ in range(MAX_FILLS):
            pg.execute(fill)
            if full_reported():
                break
        wait_until(full_reported, 60, "the receiver to report the full volume")
        assert "HINT: free space on the Tier-1 volume or grow it" in said[-1], said[-1]
        # While the volume is full, the primary keeps what the archive does not hold.
        for _ in range(3):
            assert _slot_flush(pg) <= archive_end(settings)
            pg.execute(fill)

        volume.grow(VOLUME_MB + MAX_FILLS * FILL_MB * 2)
        wait_until(lambda: _readyz(port)[0] == 200, 90, "the receiver to stream again")
        end = pg.current_lsn()
        pg.switch_wal()
        wait_closed(settings, end, timeout=90)
        archive = archive_of(settings)
        names = [s.name for s in archive.list_segments()]
        wait_until(
            lambda: set(names) <= set(announced(nats_server.url, "klio.main.wal.segment.closed")),
            60,
            "every closed segment announced",
        )

    verified = wal_verify(config)
    assert verified.returncode == 0, verified.stdout.decode() + verified.stderr.decode()
    compared = 0
    for name in names:
        dest = workdir / f"restored-{name}"
        done = wal_restore(config, name, dest)
        assert done.returncode == 0, done.stderr.decode()
        if (pg.pg_wal_dir / name).exists():  # the slot keeps them; a checkpoint may recycle one
            assert dest.read_bytes() == (pg.pg_wal_dir / name).read_bytes(), name
            compared += 1
        dest.unlink()
    assert compared >= 3


def test_wal_restore_into_a_full_pg_wal_stops_recovery_and_leaves_nothing(
    pg: Any,
    nats_server: Any,
    tier1_dir: Path,
    small_volume: Callable[..., Volume],
    keyring_files: dict[str, Path],
    workdir: Path,
) -> None:
    config = write_config(
        workdir / "k.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=keyring_files
    )
    settings = load(config)
    with receiver_inprocess(settings):
        name = close_segment(pg, settings)
    pg_wal = small_volume(4, "pg_wal")  # smaller than one 16 MB segment
    done = wal_restore(config, name, pg_wal.path / "RECOVERYXLOG", prefetch=0)
    assert done.returncode == 150, done  # above 125: PostgreSQL stops instead of promoting
    stderr = done.stderr.decode()
    assert f"no space left on device writing {pg_wal.path / 'RECOVERYXLOG'}" in stderr, stderr
    assert "HINT: free space on that volume (pg_wal)" in stderr, stderr
    assert list(pg_wal.path.iterdir()) == []
