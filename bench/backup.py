"""Base backup benchmarks: backup time, second-backup size and restore time vs pg_basebackup."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.lab import (
    CLUSTER,
    VENV_BIN,
    Lab,
    children_cpu,
    drop_tree,
    klio_receiver,
    process_cpu,
    say,
)
from klio_basebackup.backup import BackupJob
from klio_basebackup.service import build_runners
from klio_basebackup.state import BackupMetrics
from klio_common.catalog.backups import BackupManifest, new_backup_id
from klio_common.catalog.wal import WalArchive
from klio_common.pg.lsn import Lsn
from klio_common.runtime.allocator import tune_allocator
from klio_common.runtime.settings import Settings
from klio_dev import PG_BIN

SLOT = "bench_backup"
PAGE = 8192
TIMEOUT = 1800.0
RANDOM_TABLE = "bench_random"
# A relation fork segment: <relfilenode>[_fsm|_vm|_init][.<segment>] (pg_class.relfilenode).
_RELATION_FILE = re.compile(r"^\d+(_(fsm|vm|init))?(\.\d+)?$")
_BATCH = 100_000
_ROW = (
    "md5(random()::text), (random() * 9e18)::bigint, now() - random() * interval '3650 days',"
    " md5(random()::text) || ' ' || md5(random()::text) || ' '"
    " || substr(md5(random()::text), 1, (random() * 32)::int)"
)


def run(lab: Lab, *, runs: int, cluster_bytes: int, change_share: float = 0.02) -> dict[str, Any]:
    """Fill the cluster, then time backups, a second backup after a change, and restores.

    Args:
        lab: the servers.
        runs: runs per variant of the backup and restore benchmarks.
        cluster_bytes: the cluster is filled up to at least this size.
        change_share: the share of the cluster the change before the second backup writes.

    Returns:
        ``{"cluster": {...}, "backup": {...}, "incremental": {...}, "restore": {...}}``.
    """
    base = lab.root / "backup"
    base.mkdir()
    cluster = fill_cluster(lab, cluster_bytes)
    config = lab.klio_config(base, slot=SLOT, encrypted=True, compression="zstd")
    settings = Settings.load(config, {})
    lab.create_slots([SLOT])  # after a checkpoint: the receiver starts near the end of WAL
    receiver = klio_receiver(config, base / "receiver.log")
    try:
        archive = WalArchive(base / "tier1", CLUSTER)
        receiver.wait_for(archive.identity_path.exists, TIMEOUT, "the receiver to connect")
        backup, last = _backups(lab, settings, base, runs, receiver.pid)
        incremental, second = _incremental(lab, settings, base, last, change_share)
        restore = _restores(lab, config, base, second, runs)
    finally:
        receiver.stop()
        lab.drop_slots([SLOT])
    return {"cluster": cluster, "backup": backup, "incremental": incremental, "restore": restore}


# -- the data -------------------------------------------------------------------------------------


def cluster_size(lab: Lab) -> int:
    """Bytes of every database (what a base backup copies, apart from WAL and a few files)."""
    return int(lab.pg.sql("SELECT sum(pg_database_size(oid))::bigint FROM pg_database")[0][0])


def insert_random(lab: Lab, rows: int) -> None:
    """Append ``rows`` rows of random text and numbers (about 2x compressible, pitfall P14)."""
    lab.pg.execute(
        f"CREATE TABLE IF NOT EXISTS {RANDOM_TABLE} (id bigserial PRIMARY KEY, a text,"
        " b bigint, c timestamptz, d text)"
    )
    while rows > 0:
        batch = min(rows, _BATCH)
        lab.pg.execute(
            f"INSERT INTO {RANDOM_TABLE} (a, b, c, d) SELECT {_ROW} FROM generate_series(1, %s)",
            [batch],
        )
        rows -= batch


def fill_cluster(lab: Lab, target: int) -> dict[str, int]:
    """Fill the cluster to ``target`` bytes: ~60% pgbench, the rest random rows; then VACUUM.

    The same data whatever ran before in the lab: the random rows earlier benchmarks left are
    dropped and pgbench is initialized anew (a full run used to back up 85% random rows from
    the ingest benchmark, 2x compressible, and a backup-only run 35%).

    Returns:
        ``{"bytes", "pgbench_bytes", "random_bytes"}`` once filled.
    """
    lab.pg.execute(f"DROP TABLE IF EXISTS {RANDOM_TABLE}")
    scale = max(1, round(target * 0.6 / 15_000_000))  # pgbench: ~15 MB per scale unit
    say(f"backup: pgbench -i -s {scale}")
    lab.pgbench_init(scale)
    # At least a third random rows: pgbench alone compresses 18-38x (pitfall P14).
    while (size := cluster_size(lab)) < target or _relation_size(lab, RANDOM_TABLE) < target / 3:
        rows = max(10_000, min(10 * _BATCH, (target - size) // 200))
        insert_random(lab, rows)
    lab.pg.execute("VACUUM ANALYZE")  # hint bits and the visibility map set once, not mid-run
    lab.pg.execute("CHECKPOINT")
    filled = {
        "bytes": cluster_size(lab),
        "pgbench_bytes": sum(
            _relation_size(lab, t)
            for t in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers")
        ),
        "random_bytes": _relation_size(lab, RANDOM_TABLE),
    }
    say(f"backup: cluster of {filled['bytes'] / 1e6:.0f} MB ({filled})")
    return filled


def _relation_size(lab: Lab, table: str) -> int:
    rows = lab.pg.sql("SELECT coalesce(pg_total_relation_size(to_regclass(%s)), 0)", [table])
    return int(rows[0][0])


def changed_pages(pgdata: Path, since: int) -> dict[str, int]:
    """Count the relation pages whose LSN (header bytes 0-7) is past ``since``.

    Reads every relation fork file of every database and tablespace directly; run a
    CHECKPOINT first so that the files hold every change.

    Returns:
        ``{"pages", "bytes", "files"}``: changed pages, their bytes, the files holding any.
    """
    pages = files = 0
    roots = [pgdata / "global", pgdata / "base", pgdata / "pg_tblspc"]
    for root in roots:
        for directory, _, names in os.walk(root, followlinks=True):
            for name in names:
                if not _RELATION_FILE.match(name):
                    continue
                count = _changed_in(Path(directory) / name, since)
                pages += count
                files += count > 0
    return {"pages": pages, "bytes": pages * PAGE, "files": files}


def _changed_in(path: Path, since: int) -> int:
    count = 0
    with path.open("rb") as f:
        while block := f.read(PAGE * 1024):
            view = memoryview(block)
            for offset in range(0, len(view) - PAGE + 1, PAGE):
                high = int.from_bytes(view[offset : offset + 4], "little")
                low = int.from_bytes(view[offset + 4 : offset + 8], "little")
                count += (high << 32 | low) > since
    return count


def change(lab: Lab, share: float) -> dict[str, int]:
    """An append-mostly change of about ``share`` of the cluster: new rows, hot-range updates.

    Nine tenths of the bytes are new random rows; the rest updates the first accounts
    (pgbench's ``abalance``), a small hot range.

    Returns:
        ``{"inserted_rows", "updated_rows"}``.
    """
    size = cluster_size(lab)
    row = max(1, _relation_size(lab, RANDOM_TABLE)) / max(1, _count(lab, RANDOM_TABLE))
    inserted = max(1000, int(size * share * 0.9 / row))
    updated = max(100, int(size * share * 0.1 / 160))  # ~160 bytes per account with its index
    insert_random(lab, inserted)
    lab.pg.execute("UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= %s", [updated])
    lab.pg.execute("CHECKPOINT")
    return {"inserted_rows": inserted, "updated_rows": updated}


def _count(lab: Lab, table: str) -> int:
    return int(lab.pg.sql(f"SELECT count(*) FROM {table}")[0][0])


# -- one backup ---------------------------------------------------------------------------------


def klio_backup(settings: Settings) -> tuple[BackupManifest, dict[str, float]]:
    """Take one backup with the basebackup service's own job, in this process.

    Returns:
        The committed manifest and ``{"seconds", "stream_seconds", "wal_wait_seconds",
        "commit_seconds", "cpu_seconds"}`` (from the request to the commit).
    """
    tune_allocator()  # as klio-basebackup's process does at start (runtime.lifecycle)
    ctx = build_runners(settings, BackupMetrics())[CLUSTER].ctx
    began = time.perf_counter()
    cpu = _self_cpu()
    backup_id = new_backup_id()
    while ctx.catalog.backup_dir(backup_id).exists():  # ids have one-second resolution
        time.sleep(0.05)
        backup_id = new_backup_id()
    ctx.catalog.begin(backup_id)
    job = BackupJob(ctx, backup_id, [None])
    manifest = asyncio.run(job.run())
    seconds = time.perf_counter() - began
    if manifest is None:
        raise RuntimeError(f"klio backup {backup_id} failed; see the log above")
    return manifest, {
        "seconds": seconds,
        "stream_seconds": job.timings["stream"],
        "wal_wait_seconds": job.timings["wal_wait"],
        "commit_seconds": job.timings["commit"],
        "cpu_seconds": _self_cpu() - cpu,
    }


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pg_basebackup(lab: Lab, out: Path, fmt: str) -> dict[str, float]:
    """``pg_basebackup -F<fmt> -X none -c fast`` into ``out``, timed from start to exit."""
    argv = [
        str(PG_BIN / "pg_basebackup"),
        "--no-password",
        "-d",
        lab.replication_conninfo("bench_pgbb"),
        "-D",
        str(out),
        f"-F{fmt}",
        "-X",
        "none",
        "-c",
        "fast",
    ]
    cpu = children_cpu()
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=lab.client_env(), check=False)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"pg_basebackup failed ({done.returncode}): {done.stderr}")
    return {"seconds": seconds, "cpu_seconds": children_cpu() - cpu, "bytes": tree_size(out)}


def tree_size(path: Path) -> int:
    """Bytes of the regular files below ``path``."""
    total = 0
    for directory, _, names in os.walk(path):
        for name in names:
            p = Path(directory) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total


def _reset_store(tier1: Path, attic: Path) -> None:
    """Move the chunk store and the backups aside: the next backup starts from nothing.

    Moved, not deleted: ext4 skips recently deleted inodes when it allocates new ones, so
    creating thousands of chunk files right after deleting thousands costs a scan each (it
    tripled a backup's system time here) and would measure the file system, not Klio.
    """
    attic.mkdir(parents=True, exist_ok=True)
    for name in ("chunks", "backups"):
        if (tier1 / CLUSTER / name).exists():
            (tier1 / CLUSTER / name).rename(attic / f"{name}-{len(list(attic.iterdir()))}")
    os.sync()


# -- the three benchmarks -----------------------------------------------------------------------


def _backups(
    lab: Lab, settings: Settings, base: Path, runs: int, receiver: int
) -> tuple[dict[str, Any], BackupManifest]:
    """Benchmark 4: each run, a fresh chunk store (no dedup from earlier runs) against -Ft."""
    tier1 = base / "tier1"
    samples: dict[str, list[dict[str, float]]] = {"pg_basebackup": [], "klio": []}
    last: BackupManifest | None = None
    for i in range(runs):
        for variant in ("pg_basebackup", "klio")[:: 1 if i % 2 == 0 else -1]:
            if variant == "pg_basebackup":
                out = base / f"pgbb_{i}"
                sample = pg_basebackup(lab, out, "t")
                drop_tree(out)
            else:
                _reset_store(tier1, base / "attic")
                before = process_cpu(receiver)
                last, sample = klio_backup(settings)
                sample["receiver_cpu_seconds"] = process_cpu(receiver) - before
                sample["bytes"] = last.size
                sample["stored_bytes"] = tree_size(tier1 / CLUSTER / "chunks")
            samples[variant].append(sample)
            say(f"backup {i + 1}/{runs} {variant}: {sample['seconds']:.2f} s")
    assert last is not None
    return {"samples": samples}, last


def _incremental(
    lab: Lab, settings: Settings, base: Path, first: BackupManifest, share: float
) -> tuple[dict[str, Any], BackupManifest]:
    """Benchmark 5: bytes a second backup adds to Tier 1 against the pages that changed."""
    cluster_dir = base / "tier1" / CLUSTER
    made = change(lab, share)
    since = int(Lsn.parse(first.start_lsn))
    pages = changed_pages(lab.pg.data_dir, since)
    before = {n: tree_size(cluster_dir / n) for n in ("chunks", "backups")}
    second, sample = klio_backup(settings)
    added = {n: tree_size(cluster_dir / n) - before[n] for n in ("chunks", "backups")}
    say(
        f"incremental: {pages['bytes'] / 1e6:.1f} MB of pages changed since {first.start_lsn}, "
        f"{sum(added.values()) / 1e6:.1f} MB added to Tier 1"
    )
    result = {
        **made,
        "first_start_lsn": first.start_lsn,
        "changed_pages": pages["pages"],
        "changed_bytes": pages["bytes"],
        "changed_files": pages["files"],
        "added_bytes": sum(added.values()),
        "added_chunk_bytes": added["chunks"],
        "added_manifest_bytes": added["backups"],
        "chunks_new": second.chunks_new,
        "chunks_total": second.chunks_total,
        "backup_bytes": second.size,
        "seconds": sample["seconds"],
    }
    return result, second


def _restores(
    lab: Lab, config: Path, base: Path, backup: BackupManifest, runs: int
) -> dict[str, Any]:
    """Benchmark 6: ``klio restore`` (materialise, no recovery) against ``-Fp``."""
    samples: dict[str, list[dict[str, float]]] = {"pg_basebackup": [], "klio": []}
    for i in range(runs):
        for variant in ("klio", "pg_basebackup")[:: 1 if i % 2 == 0 else -1]:
            out = base / f"restore_{variant}_{i}"
            if variant == "pg_basebackup":
                sample = pg_basebackup(lab, out, "p")
            else:
                sample = klio_restore(config, backup.id, out)
                if i == 0:
                    _verify(out)
            samples[variant].append(sample)
            say(f"restore {i + 1}/{runs} {variant}: {sample['seconds']:.2f} s")
            drop_tree(out)
    return {"backup_id": backup.id, "bytes": backup.size, "samples": samples}


def klio_restore(config: Path, backup_id: str, out: Path) -> dict[str, float]:
    """``klio restore --pgdata out --backup ID`` as a process, timed from start to exit."""
    argv = [str(VENV_BIN / "klio"), "--config", str(config), "restore"]
    argv += ["--pgdata", str(out), "--backup", backup_id, "--json"]
    cpu = children_cpu()
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"klio restore failed ({done.returncode}): {done.stderr}")
    summary = json.loads(done.stdout)
    return {"seconds": seconds, "cpu_seconds": children_cpu() - cpu, "bytes": summary["bytes"]}


def _verify(pgdata: Path) -> None:
    """The restored directory must be the backup PostgreSQL described (its manifest)."""
    done = subprocess.run(
        [str(PG_BIN / "pg_verifybackup"), "-n", str(pgdata)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pg_verifybackup -n {pgdata} failed: {done.stderr}")
