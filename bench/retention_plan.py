"""Retention planning time for a catalog of 100 backups and 100,000 WAL segments per tier.

The planner is a pure function of a snapshot, so this builds snapshots in memory (three
timelines, history files, chunks shared between backups, unrelayed and locked items) and times
``plan`` alone: what every run of ``klio-retention`` costs on top of reading its catalog.
"""

from __future__ import annotations

import datetime
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from klio_common.pg.lsn import Lsn
from klio_common.pg.timeline import HistoryEntry, TimelineHistory
from klio_retention.planner import plan
from klio_retention.policy import Policy
from klio_retention.snapshot import BackupEntry, ChunkEntry, Snapshot, WalEntry

SEG = 16 << 20
NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.UTC)


def build(
    tier: int, *, backups: int, segments: int, chunks_per_backup: int, seed: int = 1
) -> Snapshot:
    """A snapshot of one tier: ``segments`` WAL files over three timelines, one backup a day."""
    rng = random.Random(seed)
    switch2, switch3 = segments // 3, 2 * segments // 3
    histories = {
        2: TimelineHistory(2, [HistoryEntry(1, Lsn(switch2 * SEG + 4096), "failover")]),
        3: TimelineHistory(
            3,
            [
                HistoryEntry(1, Lsn(switch2 * SEG + 4096), "failover"),
                HistoryEntry(2, Lsn(switch3 * SEG + 4096), "failover"),
            ],
        ),
    }
    wal = []
    for segno in range(segments):
        tli = 1 if segno < switch2 else 2 if segno < switch3 else 3
        name = f"{tli:08X}{segno // 256:08X}{segno % 256:08X}"
        relayed = tier == 2 or segno < segments - 50
        wal.append(WalEntry(name, tli, segno, False, 5_000_000, relayed))
    pool = [f"{i:064x}" for i in range(chunks_per_backup * 5)]
    entries = []
    step = segments // backups
    for n in range(backups):
        segno = n * step + 3
        tli = 1 if segno < switch2 else 2 if segno < switch3 else 3
        window = pool[n * len(pool) // (2 * backups) :][:chunks_per_backup]
        entries.append(
            BackupEntry(
                id=f"b{n:03d}",
                timeline=tli,
                start_lsn=segno * SEG + 40,
                end_lsn=segno * SEG + 8000,
                end_time=NOW - datetime.timedelta(days=backups - n),
                chunks=frozenset(window),
                size=2_000_000,
                relayed=tier == 2 or n < backups - 1,
            )
        )
    chunks = [
        ChunkEntry(c, 60_000, (NOW - datetime.timedelta(days=rng.randint(1, 200))).timestamp())
        for c in pool
    ]
    return Snapshot(
        tier=tier,
        cluster="bench",
        seg_size=SEG,
        backups=entries,
        wal=wal,
        histories=histories,
        chunks=chunks,
        tier2=tier == 1,
    )


def run(*, runs: int = 5, quick: bool = False) -> dict[str, Any]:
    """Time ``plan`` per tier; return the raw samples and what each plan decided."""
    size = {"backups": 100, "segments": 100_000, "chunks_per_backup": 2_000 if quick else 10_000}
    policies = {1: Policy("window", 30, "days"), 2: Policy("window", 60, "days")}
    result: dict[str, Any] = {"size": size, "tiers": {}}
    for tier, policy in policies.items():
        snap = build(tier, **size)
        seconds = []
        decided = None
        for _ in range(runs):
            started = time.perf_counter()
            decided = plan(snap, NOW, policy, minimum_redundancy=1, chunk_grace=300)
            seconds.append(time.perf_counter() - started)
        assert decided is not None
        result["tiers"][str(tier)] = {
            "policy": policy.describe(),
            "seconds": seconds,
            "median_seconds": statistics.median(seconds),
            "expired": len(decided.expired),
            "wal_deleted": len(decided.wal),
            "chunks_deleted": len(decided.chunks),
            "held": len(decided.held),
        }
    return result


def render(result: dict[str, Any]) -> str:
    """The Markdown table of a run."""
    size = result["size"]
    lines = [
        f"Planning a catalog of {size['backups']} backups, {size['segments']:,} WAL segments and "
        f"{size['chunks_per_backup']:,} chunks per backup, per tier:",
        "",
        "| tier | policy | median | runs | expired | WAL deleted | chunks deleted | held |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tier, row in result["tiers"].items():
        lines.append(
            f"| {tier} | {row['policy']} | {row['median_seconds'] * 1000:.0f} ms | "
            f"{len(row['seconds'])} | {row['expired']} | {row['wal_deleted']:,} | "
            f"{row['chunks_deleted']:,} | {row['held']} |"
        )
    return "\n".join(lines)


def main(results: Path, *, runs: int, quick: bool) -> int:
    """Run, write ``results/<time>-retention_plan.json`` and print the table."""
    started = datetime.datetime.now(datetime.UTC)
    result = run(runs=runs, quick=quick)
    result["python"] = platform.python_version()
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{started.strftime('%Y%m%dT%H%M%SZ')}-retention_plan.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"\nresults: {path}")
    return 0
