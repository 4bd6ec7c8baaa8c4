"""Benchmark 1: catch-up ingest of retained WAL, pg_receivewal against Klio's receiver."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from bench.lab import CLUSTER, SEGMENT, Lab, children_cpu, drop_tree, klio_receiver, say
from klio_common.catalog.wal import WalArchive
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment

RECEIVERS = ("pg_receivewal", "klio_zstd_aes", "klio_none")
_KLIO = {"klio_zstd_aes": (True, "zstd"), "klio_none": (False, "none")}
TIMEOUT = 1800.0


def slot_names(runs: int) -> list[str]:
    """One slot per (receiver, run), so every run starts from the same LSN."""
    return [f"bench_{r}_{i}" for i in range(runs) for r in RECEIVERS]


def run(lab: Lab, *, runs: int, wal_bytes: int) -> dict[str, Any]:
    """Generate ``wal_bytes`` of WAL behind fresh slots, then let each receiver catch up alone.

    Returns:
        ``{"bytes", "start_lsn", "end_lsn", "samples": {receiver: [...]}, "stored_bytes"}``.
    """
    names = slot_names(runs)
    starts = lab.create_slots(names)
    if len(set(starts.values())) != 1:
        raise RuntimeError(f"the slots reserved different start LSNs: {starts}")
    start = next(iter(starts.values()))
    start -= start % SEGMENT  # both receivers stream from the segment boundary below the slot
    lab.generate_wal(wal_bytes, pgbench_share=0.75)
    end = lab.switch_wal()
    last = WalSegment.from_lsn(1, end - 1, SEGMENT)
    say(f"ingest: {(end - start) / 1e6:.0f} MB of WAL up to segment {last.name}")
    samples: dict[str, list[dict[str, float]]] = {r: [] for r in RECEIVERS}
    stored: dict[str, list[int]] = {r: [] for r in RECEIVERS}
    base = lab.root / "ingest"
    try:
        for i in range(runs):
            # Rotate the order so no receiver always runs first (or right after a cleanup).
            for receiver in RECEIVERS[i % 3 :] + RECEIVERS[: i % 3]:
                out = base / f"{receiver}_{i}"
                slot = f"bench_{receiver}_{i}"
                if receiver == "pg_receivewal":
                    sample, size = _pg_receivewal(lab, out, slot, end, last)
                else:
                    sample, size = _klio(lab, out, slot, receiver, last)
                samples[receiver].append(sample)
                stored[receiver].append(size)
                rate = (end - start) / 1e6 / sample["seconds"]
                say(f"ingest {i + 1}/{runs} {receiver}: {sample['seconds']:.2f} s, {rate:.0f} MB/s")
                drop_tree(out)
    finally:
        lab.drop_slots(names)
        lab.pg.execute("CHECKPOINT")  # lets the server recycle the retained WAL
    return {
        "bytes": end - start,
        "start_lsn": start,
        "end_lsn": end,
        "samples": samples,
        "stored_bytes": {r: max(sizes) for r, sizes in stored.items()},
    }


def _tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _pg_receivewal(
    lab: Lab, out: Path, slot: str, end: int, last: WalSegment
) -> tuple[dict[str, float], int]:
    out.mkdir(parents=True)
    argv = lab.pg_receivewal(
        "-d",
        lab.replication_conninfo("bench_pgrw"),
        "-S",
        slot,
        "-D",
        str(out),
        # pg_receivewal stops once it has received past --endpos (strictly): END itself would
        # make it wait for the next WAL record, seconds away on an idle server.
        "--endpos",
        str(Lsn(end - 1)),
        "--no-loop",
    )
    cpu = children_cpu()
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=lab.client_env(), check=False)
    seconds = time.perf_counter() - began
    cpu = children_cpu() - cpu
    if done.returncode != 0 or not (out / last.name).is_file():
        raise RuntimeError(
            f"pg_receivewal failed (status {done.returncode}, {last.name} "
            f"{'present' if (out / last.name).is_file() else 'missing'}): {done.stderr}"
        )
    return {"seconds": seconds, "cpu_seconds": cpu}, _tree_size(out)


def _klio(
    lab: Lab, out: Path, slot: str, receiver: str, last: WalSegment
) -> tuple[dict[str, float], int]:
    encrypted, compression = _KLIO[receiver]
    config = lab.klio_config(out, slot=slot, encrypted=encrypted, compression=compression)
    archive = WalArchive(out / "tier1", CLUSTER)
    target = archive.segment_path(last.name)
    cpu = children_cpu()
    child = klio_receiver(config, out.parent / f"{out.name}.log")
    try:
        # The identity file is written right after IDENTIFY_SYSTEM: what comes before is
        # interpreter start-up, imports and the connection, a fixed cost per process.
        startup = child.wait_for(archive.identity_path.exists, TIMEOUT, f"{receiver} to connect")
        seconds = child.wait_for(target.exists, TIMEOUT, f"{receiver} to archive {last.name}")
    finally:
        status = child.stop()
    cpu = children_cpu() - cpu
    if status != 0:
        raise RuntimeError(f"klio-wal-receiver exited with status {status}; see {child.log}")
    sample = {"seconds": seconds, "cpu_seconds": cpu, "startup_seconds": startup}
    return sample, _tree_size(out / "tier1")
