"""WAL replay benchmark: recovery through ``klio wal-restore`` against ``cp`` of plain segments."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import yaml

from bench.lab import CLUSTER, SEGMENT, VENV_BIN, Lab, drop_tree, klio_receiver, say
from klio_common.catalog.wal import WalArchive
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_dev import PostgresServer, run_as_postgres, wait_until
from klio_restore import spool
from klio_restore.recovery import wal_restore_command

METHODS = ("cp", "klio")
SLOT = "bench_replay"
KEEP_SLOT = "bench_replay_keep"
TIMEOUT = 1800.0
# PostgreSQL 15 logs this once replay is over (the elapsed time runs from the redo start).
_REDO_DONE = re.compile(
    r"redo done at (\S+) system usage: CPU: user: ([0-9.]+) s, system: ([0-9.]+) s, "
    r"elapsed: ([0-9.]+) s"
)


def run(lab: Lab, *, runs: int, wal_bytes: int) -> dict[str, Any]:
    """Take a plain base backup, write ``wal_bytes`` of WAL after it, then recover it each way.

    Returns:
        ``{"segments", "bytes", "samples": {method: [{"seconds", "redo_seconds",
        "redo_cpu_seconds"}]}}``.
    """
    base = lab.root / "replay"
    base.mkdir()
    config = _config(lab, base)
    # The keep slot holds the WAL in pg_wal until the plain copies are made.
    lab.create_slots([KEEP_SLOT, SLOT])
    receiver = klio_receiver(config, base / "receiver.log")
    try:
        archive = WalArchive(base / "tier1", CLUSTER)
        receiver.wait_for(archive.identity_path.exists, TIMEOUT, "the receiver to connect")
        backup = base / "base"
        backup.mkdir(mode=0o700)
        shutil.chown(backup, "postgres", "postgres")
        run_as_postgres(
            [
                *("pg_basebackup", "-D", str(backup), "-Fp", "-X", "none", "-c", "fast"),
                *("-h", "127.0.0.1", "-p", str(lab.pg.port), "-U", "postgres"),
            ]
        )
        first = _start_segment(backup)
        lab.generate_wal(wal_bytes, pgbench_share=0.0)
        end = lab.switch_wal()
        last = WalSegment.from_lsn(1, end - 1, SEGMENT)
        path = archive.segment_path(last.name)
        receiver.wait_for(path.exists, TIMEOUT, f"the receiver to archive {last.name}")
    finally:
        receiver.stop()
        lab.drop_slots([SLOT])
    try:
        names = _copy_plain(lab, base / "plain", first, last)
    finally:
        lab.drop_slots([KEEP_SLOT])
    say(f"replay: {len(names)} segments from {first.name} to {last.name}")
    commands = {
        "cp": f"cp {base / 'plain'}/%f %p",
        "klio": wal_restore_command(VENV_BIN / "klio", config),
    }
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for i in range(runs):
        for method in METHODS[i % 2 :] + METHODS[: i % 2]:
            sample = _recover(lab, base, backup, f"{method}_{i}", commands[method], last)
            samples[method].append(sample)
            rate = len(names) / sample["redo_seconds"]
            say(f"replay {i + 1}/{runs} {method}: {sample['redo_seconds']:.2f} s, {rate:.0f} seg/s")
    return {
        "segments": len(names),
        "bytes": len(names) * SEGMENT,
        "stored_bytes": sum(archive.segment_path(n).stat().st_size for n in names),
        "samples": samples,
    }


def _config(lab: Lab, base: Path) -> Path:
    """A configuration the postgres OS user can read, with its own Tier 1 (pitfall P17).

    The Tier-1 root belongs to group postgres with the setgid bit, so every file the receiver
    (root) creates there is readable by ``restore_command``; so is a copy of the key.
    """
    tier1 = base / "tier1"
    tier1.mkdir()
    shutil.chown(tier1, group="postgres")
    tier1.chmod(0o2750)
    key = base / "k1"
    shutil.copyfile(lab.key_file, key)
    shutil.chown(key, group="postgres")
    key.chmod(0o640)
    config = lab.klio_config(base, slot=SLOT, encrypted=True, compression="zstd")
    doc = yaml.safe_load(config.read_text())
    doc["encryption"]["keys"]["k1"] = str(key)
    config.write_text(yaml.safe_dump(doc))
    config.chmod(0o644)
    return config


def _start_segment(backup: Path) -> WalSegment:
    """The segment of the backup's start (``START WAL LOCATION`` in backup_label)."""
    label = (backup / "backup_label").read_text()
    match = re.search(r"START WAL LOCATION: (\S+) \(file ([0-9A-F]{24})\)", label)
    if match is None:
        raise RuntimeError(f"no start position in backup_label:\n{label}")
    return WalSegment.parse(match.group(2), SEGMENT)


def _copy_plain(lab: Lab, out: Path, first: WalSegment, last: WalSegment) -> list[str]:
    """Copy the segments from ``first`` to ``last`` out of pg_wal: the ``cp`` archive."""
    out.mkdir()
    names = []
    seg = first
    while True:
        shutil.copyfile(lab.pg.pg_wal_dir / seg.name, out / seg.name)
        names.append(seg.name)
        if seg.name == last.name:
            break
        seg = seg.next()
    for path in (out, *out.iterdir()):
        shutil.chown(path, "postgres", "postgres")
    return names


def _recover(
    lab: Lab, base: Path, backup: Path, name: str, restore_command: str, last: WalSegment
) -> dict[str, float]:
    """Recover a copy of the backup to the end of the archive; time it until promotion."""
    server = PostgresServer(
        base,
        name=name,
        settings={
            **lab.pg.settings,
            "restore_command": restore_command,
            "recovery_target_action": "promote",
        },
    )
    server._prepare_root()
    subprocess.run(["cp", "-a", str(backup), str(server.data_dir)], check=True)
    server._write_config()
    run_as_postgres(["touch", str(server.data_dir / "recovery.signal")])
    os.sync()  # the copy's write-back must not land inside the measurement
    try:
        began = time.perf_counter()
        server.start()
        wait_until(
            lambda: not _in_recovery(server),
            TIMEOUT,
            f"{name} to finish recovery",
            interval=0.05,
            ignore=(psycopg.OperationalError,),  # e.g. "the database system is starting up"
        )
        seconds = time.perf_counter() - began
        match = _REDO_DONE.search(server.log_path.read_text(errors="replace"))
        if match is None:
            raise RuntimeError(f"no 'redo done' line in {server.log_path}")
        redo_end = WalSegment.from_lsn(1, int(Lsn.parse(match.group(1))), SEGMENT)
        if redo_end.name != last.name:
            raise RuntimeError(f"{name} stopped replay in {redo_end.name}, not {last.name}")
    finally:
        server.stop("immediate")
        _wait_prefetchers(server.data_dir)
    drop_tree(server.root)
    return {
        "seconds": seconds,
        "redo_seconds": float(match.group(4)),
        "redo_cpu_seconds": float(match.group(2)) + float(match.group(3)),
    }


def _in_recovery(server: PostgresServer) -> bool:
    return bool(server.sql("SELECT pg_is_in_recovery()")[0][0])


def _wait_prefetchers(pgdata: Path) -> None:
    """Wait until no prefetcher serves this data directory (each exits at the archive's end)."""

    def gone() -> bool:
        for lock in pgdata.glob(f"pg_wal/{spool.SPOOL_NAME}/lock"):
            owner = spool.read_owner(str(lock.parent))
            if owner is not None and spool.is_prefetcher(owner.pid):
                return False
        return True

    wait_until(gone, 120, "the prefetcher to exit", interval=0.1)
