"""Benchmark: the relay's Tier-1-to-bucket throughput against a plain boto3 upload."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import yaml

from bench.lab import VENV_BIN, Child, Lab, children_cpu, process_cpu, say
from bench.relay_backlog import CLUSTER, evict, fill
from klio_common.events import Event
from klio_common.events.codec import encode
from klio_common.events.subjects import subject
from klio_dev import S3Server

BUCKET = "klio-bench"
VARIANTS = ("relay", "relay_running", "boto3", "boto3_verified")
CONCURRENCY = 4
TIMEOUT = 1800.0

# The baselines: every file under ROOT to KEY_PREFIX + its relative path, CONCURRENCY at a time.
# "plain" is put_object with boto3's defaults, as a script would do it; "verified" makes the
# relay's requests (SHA-256 checksum, If-None-Match, then a HEAD comparing size and checksum), so
# the difference between the two is the bucket protocol and the rest is the relay's own work.
_BOTO3 = """
import base64, concurrent.futures as cf, hashlib, sys, boto3, botocore.config
import time
endpoint, bucket, prefix, root, jobs, listing, mode = sys.argv[1:]
paths = open(listing).read().split()
client = boto3.client("s3", endpoint_url=endpoint,
    config=botocore.config.Config(max_pool_connections=int(jobs)))
began = time.perf_counter()
def put(rel):
    with open(root + "/" + rel, "rb") as f:
        body = f.read()
    if mode == "plain":
        client.put_object(Bucket=bucket, Key=prefix + rel, Body=body)
        return
    sha = base64.b64encode(hashlib.sha256(body).digest()).decode()
    client.put_object(Bucket=bucket, Key=prefix + rel, Body=body, IfNoneMatch="*",
        ChecksumAlgorithm="SHA256", ChecksumSHA256=sha)
    head = client.head_object(Bucket=bucket, Key=prefix + rel, ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(body) and head["ChecksumSHA256"] == sha, rel
with cf.ThreadPoolExecutor(int(jobs)) as pool:
    list(pool.map(put, paths))
print(time.perf_counter() - began)  # the uploads alone: from the client's first request
"""


def run(lab: Lab, *, runs: int, total_bytes: int) -> dict[str, Any]:
    """Fill a Tier-1 directory with ``total_bytes`` of objects; time relay and boto3 uploads.

    About three quarters of the bytes are 16 MiB WAL segments, the rest chunks of the default size
    of one committed backup (whose WAL range is those segments): the relay's two kinds of work.

    Returns:
        ``{"bytes", "objects", "concurrency", "samples": {variant: [{"seconds",
        "cpu_seconds"}, ...]}}``.
    """
    base = lab.root / "relay_throughput"
    s3 = S3Server(lab.root, name="s3-throughput").start()
    try:
        config, tier1 = _config(lab, base, s3)
        paths, events = fill(lab, tier1 / CLUSTER, total_bytes)
        size = sum((tier1 / CLUSTER / p).stat().st_size for p in paths)
        listing = base / "objects.txt"
        listing.write_text("\n".join(paths) + "\n")
        say(f"relay_throughput: {len(paths)} objects, {size / 1e6:.0f} MB on Tier 1")
        samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        env = {**os.environ, **s3.env(), "KLIO_LOG_FORMAT": "text"}
        for index in range(runs):
            order = VARIANTS[index % 3 :] + VARIANTS[: index % 3]
            for variant in order:
                s3.reset()
                s3.create_bucket(BUCKET)
                evict(tier1 / CLUSTER, paths)
                if variant == "relay":
                    sample = _relay(config, tier1 / CLUSTER, base, env, len(paths))
                elif variant == "relay_running":
                    sample = _relay_running(
                        config, tier1 / CLUSTER, base, env, len(paths), events, lab.nats.url
                    )
                else:
                    sample = _boto3(s3, tier1 / CLUSTER, listing, env, variant)
                _check_bucket(s3, len(paths), size)
                say(f"relay_throughput {variant}: {size / sample['seconds'] / 1e6:.0f} MB/s")
                samples[variant].append(sample)
    finally:
        s3.stop()
    return {"bytes": size, "objects": len(paths), "concurrency": CONCURRENCY, "samples": samples}


def _config(lab: Lab, base: Path, s3: S3Server) -> tuple[Path, Path]:
    config = lab.klio_config(base, slot="bench_tput", encrypted=True, compression="zstd")
    doc = yaml.safe_load(config.read_text())
    doc["clusters"][0]["name"] = CLUSTER
    doc["tier2"] = {"s3": {"bucket": BUCKET, "endpoint_url": s3.endpoint_url}}
    doc["relay"] = {"concurrency": CONCURRENCY, "reconcile_interval": 3600}
    doc["services"]["relay"] = {"http_port": 0, "http_host": "127.0.0.1"}
    config.write_text(yaml.safe_dump(doc))
    return config, base / "tier1"


class _Journal:
    """Counts the distinct paths in the relay's Tier-2 journal, reading only what was appended.

    The harness polls every 10 ms while the relay runs; re-reading and splitting the whole
    journal each time cost the benchmark process ~10% of a core, taken from the two the relay
    and the S3 server share (the boto3 variants are not polled at all).
    """

    def __init__(self, cluster_dir: Path) -> None:
        self.path = cluster_dir / "tier2" / "journal"
        self.offset = 0
        self.tail = b""
        self.paths: set[bytes] = set()

    def count(self) -> int:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                fresh = f.read()
        except FileNotFoundError:
            return 0
        self.offset += len(fresh)
        *lines, self.tail = (self.tail + fresh).split(b"\n")
        self.paths.update(line.split(b"\t", 1)[0] for line in lines if line.count(b"\t") == 2)
        return len(self.paths)


def _relay(
    config: Path, cluster_dir: Path, base: Path, env: dict[str, str], objects: int
) -> dict[str, float]:
    """Start ``klio-relay`` on the filled Tier 1 (its start-up reconciliation relays it all)."""
    shutil.rmtree(cluster_dir / "tier2", ignore_errors=True)  # a fresh journal: nothing sent
    shutil.rmtree(cluster_dir / "outbox", ignore_errors=True)
    child = Child(
        [str(VENV_BIN / "klio-relay"), "--config", str(config)], base / "relay.log", env=env
    )
    try:
        journal = _Journal(cluster_dir)
        seconds = child.wait_for(
            lambda: journal.count() >= objects, TIMEOUT, "every object relayed"
        )
        cpu = process_cpu(child.pid)
    finally:
        child.stop()
    return {"seconds": seconds, "cpu_seconds": cpu}


def _relay_running(
    config: Path,
    cluster_dir: Path,
    base: Path,
    env: dict[str, str],
    objects: int,
    events: list[Event],
    nats_url: str,
) -> dict[str, float]:
    """A relay already running (as it does in production) relays what the events announce.

    The objects are moved aside while the relay starts (it finds only ``identity.json``, which
    goes up with the first backup), moved back once it consumes, then the events are published.
    Timed from the first event until the journal lists every object; CPU over the same window.
    """
    shutil.rmtree(cluster_dir / "tier2", ignore_errors=True)
    shutil.rmtree(cluster_dir / "outbox", ignore_errors=True)
    aside = base / "aside"
    aside.mkdir(exist_ok=True)
    moved = [d for d in ("wal", "chunks", "backups") if (cluster_dir / d).exists()]
    for name in moved:
        (cluster_dir / name).rename(aside / name)
    log = base / "relay-running.log"
    child = Child([str(VENV_BIN / "klio-relay"), "--config", str(config)], log, env=env)
    try:
        journal = _Journal(cluster_dir)
        child.wait_for(
            lambda: "relaying " in log.read_text(),  # consumers bound, start-up reconciled
            TIMEOUT,
            "the relay to consume",
        )
        for name in moved:
            (aside / name).rename(cluster_dir / name)
        cpu = process_cpu(child.pid)
        began = time.perf_counter()
        asyncio.run(_publish(nats_url, events))
        child.wait_for(lambda: journal.count() >= objects, TIMEOUT, "every object relayed")
        seconds = time.perf_counter() - began
        cpu = process_cpu(child.pid) - cpu
    finally:
        child.stop()
        for name in moved:
            if (aside / name).exists():
                (aside / name).rename(cluster_dir / name)
    return {"seconds": seconds, "cpu_seconds": cpu}


async def _publish(nats_url: str, events: list[Event]) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for event in events:
            await js.publish(
                subject(CLUSTER, event), encode(event), headers={"Nats-Msg-Id": event.event_id}
            )
    finally:
        await nc.close()


def _boto3(
    s3: S3Server, cluster_dir: Path, listing: Path, env: dict[str, str], variant: str
) -> dict[str, float]:
    argv = [
        sys.executable,
        "-c",
        _BOTO3,
        s3.endpoint_url,
        BUCKET,
        f"{CLUSTER}/",
        str(cluster_dir),
        str(CONCURRENCY),
        str(listing),
        "plain" if variant == "boto3" else "verified",
    ]
    cpu = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(
        argv, env=env, check=True, timeout=TIMEOUT, capture_output=True, text=True
    )
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": children_cpu() - cpu,
        "upload_seconds": float(done.stdout.split()[-1]),
    }


def _check_bucket(s3: S3Server, objects: int, size: int) -> None:
    client = s3.client()
    found, stored = 0, 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            found += 1
            stored += item["Size"]
    if (found, stored) != (objects, size):
        raise RuntimeError(
            f"bucket holds {found} objects, {stored} bytes; expected {objects}, {size}"
        )


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Median MB/s and CPU share of each variant, and ratios (higher is better).

    Processes started for the upload (``relay``, ``boto3_verified``) compare with plain boto3
    from its process start; the running relay compares with boto3's uploads alone, from its
    first request (``upload_seconds``): neither counts starting up.
    """
    out: dict[str, Any] = {}
    for variant, samples in raw["samples"].items():
        seconds = statistics.median(s["seconds"] for s in samples)
        cpu = statistics.median(s["cpu_seconds"] / s["seconds"] for s in samples)
        out[variant] = {"median_mb_s": raw["bytes"] / seconds / 1e6, "cpu_pct": 100 * cpu}
    uploads = [s["upload_seconds"] for s in raw["samples"]["boto3"] if "upload_seconds" in s]
    if uploads:
        out["boto3_uploads"] = {"median_mb_s": raw["bytes"] / statistics.median(uploads) / 1e6}
    base = out["boto3"]["median_mb_s"]
    out["ratio"] = {v: out[v]["median_mb_s"] / base for v in raw["samples"] if v not in ("boto3",)}
    if "relay_running" in out and "boto3_uploads" in out:
        warm = out["boto3_uploads"]["median_mb_s"]
        out["ratio"]["relay_running"] = out["relay_running"]["median_mb_s"] / warm
    return out


def render(summary: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """The Markdown table."""
    runs = len(raw["samples"]["relay"])
    jobs = raw["concurrency"]
    rows = [
        ("boto3", f"boto3 `put_object`, {jobs} threads, from process start (baseline)"),
        (
            "boto3_verified",
            f"boto3, {jobs} threads, the relay's requests: SHA-256, If-None-Match, HEAD",
        ),
        (
            "relay",
            "`klio-relay` started on the filled Tier 1, from process start (opens each object, "
            "checksum, conditional PUT, ETag or HEAD, journal, events)",
        ),
        ("boto3_uploads", f"boto3 `put_object`, {jobs} threads, from its first request (baseline)"),
        ("relay_running", "`klio-relay` already running, from the first event announcing them"),
    ]
    lines = [
        f"### Relay throughput: {raw['objects']} objects, {raw['bytes'] / 1e6:.0f} MB "
        f"({runs} run{'s' if runs > 1 else ''} each, concurrency {jobs})",
        "",
        "| upload | median MB/s | CPU (% of a core) | ratio |",
        "|---|---|---|---|",
    ]
    for variant, label in rows:
        if variant not in summary:
            continue
        ratio = summary["ratio"].get(variant, 1.0)
        figures = summary[variant]
        cpu = f"{figures['cpu_pct']:.0f}%" if "cpu_pct" in figures else "—"
        lines.append(f"| {label} | {figures['median_mb_s']:.0f} | {cpu} | {ratio:.2f}× |")
    return [*lines, ""]


def main() -> None:  # pragma: no cover - manual runs: python -m bench.relay_throughput
    with Lab(quick=True) as lab:
        raw = run(lab, runs=1, total_bytes=200_000_000)
        print(json.dumps(summarize(raw), indent=2))


if __name__ == "__main__":
    main()
