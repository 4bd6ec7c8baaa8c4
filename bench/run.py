"""``make bench``: run the WAL archive benchmarks side by side with PostgreSQL's own tools."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import (
    backup,
    relay_lag,
    relay_throughput,
    replay,
    report,
    retention_plan,
    sync_standby,
    wal_ingest,
    wal_restore_cost,
)
from bench.lab import Lab, say

BENCHMARKS = ("wal_ingest", "sync_standby", "wal_restore_cost", "backup", "replay")
STANDALONE = ("retention_plan",)  # no lab: only with --only
RELAY = {"relay_throughput": relay_throughput, "relay_lag": relay_lag}
"""Tier-2 benchmarks (summarized and rendered by their modules): in a full run and with --only."""
RESULTS = Path(__file__).resolve().parent / "results"
GB = 1_000_000_000


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line (``--quick`` shrinks every size for a smoke run)."""
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--only", choices=(*BENCHMARKS, *STANDALONE, *RELAY), help="run one benchmark"
    )
    parser.add_argument("--runs", type=int, help="runs per variant (default 3; --quick: 1)")
    parser.add_argument("--wal-gb", type=float, help="WAL to ingest (default 1.0; --quick: 0.05)")
    parser.add_argument("--cluster-gb", type=float, help="backup: cluster size (1.2; quick 0.03)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the lab directory")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.wal_gb is None:
        args.wal_gb = 0.05 if args.quick else 1.0
    if args.cluster_gb is None:
        args.cluster_gb = 0.03 if args.quick else 1.2
    if args.runs < 1 or args.wal_gb <= 0:
        parser.error("--runs must be at least 1 and --wal-gb greater than 0")
    return args


def machine(lab: Lab) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    meminfo = Path("/proc/meminfo").read_text().split()
    memory_kb = int(meminfo[meminfo.index("MemTotal:") + 1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
        check=False,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": memory_kb / 1024 / 1024,
        "kernel": f"{platform.system()} {platform.release()}",
        "postgresql": str(lab.pg.sql("SHOW server_version")[0][0]),
        "python": platform.python_version(),
        "commit": commit or "unknown",
        # Other work on the machine skews every figure: say how busy it was.
        "loadavg_start": os.getloadavg()[0],
    }


def run_benchmarks(lab: Lab, names: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run the named benchmarks in order against the lab; return their raw results."""
    raw: dict[str, Any] = {}
    for name in names:
        say(f"--- {name}")
        if name == "wal_ingest":
            raw[name] = wal_ingest.run(lab, runs=args.runs, wal_bytes=int(args.wal_gb * GB))
        elif name == "sync_standby":
            seconds, scale = (3, 1) if args.quick else (30, 10)
            raw[name] = sync_standby.run(lab, runs=args.runs, seconds=seconds, scale=scale)
        elif name == "backup":
            size = int(args.cluster_gb * GB)
            raw[name] = backup.run(lab, runs=args.runs, cluster_bytes=size)
        elif name == "replay":
            raw[name] = replay.run(lab, runs=args.runs, wal_bytes=int(args.wal_gb * GB))
        elif name == "wal_restore_cost":
            raw[name] = wal_restore_cost.run(lab, segments=5 if args.quick else 30)
        elif name == "relay_throughput":
            size = int((0.1 if args.quick else 1.1) * GB)
            raw[name] = relay_throughput.run(lab, runs=args.runs, total_bytes=size)
        else:
            seconds, scale = (10, 2) if args.quick else (60, 50)
            raw[name] = relay_lag.run(lab, seconds=seconds, scale=scale)
    return raw


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Every benchmark's summary, in the order they ran."""
    return {
        name: RELAY[name].summarize(data) if name in RELAY else report.summarize({name: data})[name]
        for name, data in raw.items()
    }


def render(doc: dict[str, Any]) -> str:
    """The Markdown report: the WAL benchmarks' (bench.report), then the relay's."""
    wal = {**doc, "summary": {k: v for k, v in doc["summary"].items() if k not in RELAY}}
    lines = [report.render(wal)]
    for name, summary in doc["summary"].items():
        if name in RELAY:
            lines += ["", *RELAY[name].render(summary, doc["raw"][name])]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks, write ``results/<time>.json`` and print the Markdown report."""
    args = parse_args(argv)
    if args.only == "retention_plan":
        return retention_plan.main(args.results, runs=args.runs, quick=args.quick)
    names = [args.only] if args.only else list(BENCHMARKS)
    if not args.only and not args.quick:
        names += list(RELAY)
    started = datetime.datetime.now(datetime.UTC)
    slots = len(wal_ingest.RECEIVERS) * args.runs if "wal_ingest" in names else 2
    with Lab(quick=args.quick, slots=slots, keep=args.keep) as lab:
        info = machine(lab)
        raw = run_benchmarks(lab, names, args)
        info["loadavg_end"] = os.getloadavg()[0]
    doc = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "options": {
            "only": args.only,
            "runs": args.runs,
            "wal_gb": args.wal_gb,
            "cluster_gb": args.cluster_gb,
            "quick": args.quick,
        },
        "raw": raw,
        "summary": summarize(raw),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(render(doc))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
