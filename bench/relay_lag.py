"""Benchmark: seconds from ``wal.segment.closed`` to ``tier2.wal.relayed`` under pgbench load."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import yaml

from bench.lab import VENV_BIN, Child, Lab, say
from klio_common.catalog.wal import WalArchive
from klio_dev import S3Server, wait_until

CLUSTER = "lag"  # its own subjects: klio.lag.>
SLOT = "bench_lag"
BUCKET = "klio-bench-lag"
TIMEOUT = 600.0


def run(lab: Lab, *, seconds: int, scale: int) -> dict[str, Any]:
    """Run the wal-receiver and the relay while pgbench writes; pair each segment's events.

    ``pgbench -i -s scale`` then ``pgbench -c 4 -j 2 -T seconds``, then a WAL switch; every
    segment closed meanwhile is matched with its ``tier2.wal.relayed`` (published once a HEAD
    verified the upload), and the lag is the difference of the two events' ``occurred_at``.

    Returns:
        ``{"segments", "seconds", "scale", "tps", "lags": [seconds per segment]}``.
    """
    base = lab.root / "relay_lag"
    s3 = S3Server(lab.root, name="s3-lag").start()
    try:
        s3.create_bucket(BUCKET)
        config = _config(lab, base, s3)
        archive = WalArchive(base / "tier1", CLUSTER)
        env = {**os.environ, **s3.env(), "KLIO_LOG_FORMAT": "text"}
        lab.create_slots([SLOT])
        receiver = Child(
            [str(VENV_BIN / "klio-wal-receiver"), "--config", str(config)],
            base / "receiver.log",
            env=env,
        )
        relay = Child(
            [str(VENV_BIN / "klio-relay"), "--config", str(config)], base / "relay.log", env=env
        )
        try:
            receiver.wait_for(archive.identity_path.exists, TIMEOUT, "the receiver to connect")
            say(f"relay_lag: pgbench -i -s {scale}, then {seconds} s of pgbench")
            lab.pgbench_init(scale)
            tps = lab.pgbench(seconds)
            lab.switch_wal()
            last = _last_closed(lab, archive)
            relay.wait_for(
                lambda: last in _occurred(lab.nats.url, "tier2.wal.relayed"),
                TIMEOUT,
                f"{last} relayed",
            )
        finally:
            relay.stop()
            receiver.stop()
            lab.drop_slots([SLOT])
    finally:
        s3.stop()
    closed = _occurred(lab.nats.url, "wal.segment.closed")
    relayed = _occurred(lab.nats.url, "tier2.wal.relayed")
    lags = [(relayed[n] - at).total_seconds() for n, at in sorted(closed.items()) if n in relayed]
    if len(lags) != len(closed):
        raise RuntimeError(f"{len(closed) - len(lags)} closed segments were never relayed")
    say(f"relay_lag: {len(lags)} segments, max lag {max(lags):.2f} s")
    return {"segments": len(lags), "seconds": seconds, "scale": scale, "tps": tps, "lags": lags}


def _config(lab: Lab, base: Path, s3: S3Server) -> Path:
    config = lab.klio_config(base, slot=SLOT, encrypted=True, compression="zstd")
    doc = yaml.safe_load(config.read_text())
    doc["clusters"][0]["name"] = CLUSTER
    doc["tier2"] = {"s3": {"bucket": BUCKET, "endpoint_url": s3.endpoint_url}}
    doc["services"]["relay"] = {"http_port": 0, "http_host": "127.0.0.1"}
    config.write_text(yaml.safe_dump(doc))
    return config


def _last_closed(lab: Lab, archive: WalArchive) -> str:
    """Wait for the segment the switch closed; its name."""
    end = lab.lsn()
    seg_size = archive.segment_size()
    wait_until(
        lambda: any(s.end_lsn >= end for s in archive.list_segments(seg_size)),
        TIMEOUT,
        "the last segment closed",
    )
    return archive.list_segments(seg_size)[-1].name


def _occurred(nats_url: str, event: str) -> dict[str, datetime]:
    """Segment name → ``occurred_at`` of every ``klio.lag.<event>`` in the stream."""
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy

    async def read() -> dict[str, datetime]:
        nc = await nats.connect(nats_url)
        found: dict[str, datetime] = {}
        try:
            sub = await nc.jetstream().subscribe(
                f"klio.{CLUSTER}.{event}",
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            )
            try:
                while True:
                    doc = msgspec.json.decode((await sub.next_msg(timeout=1)).data)
                    found[doc["segment"]] = datetime.fromisoformat(doc["occurred_at"])
            except TimeoutError:
                return found
            finally:
                await sub.unsubscribe()
        finally:
            await nc.close()

    return asyncio.run(read())


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in 0..1) of ``values``."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * share // 1))
    return ordered[int(rank) - 1]


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """p50, p99 and max lag in seconds."""
    lags = raw["lags"]
    return {
        "lag": {
            "p50_s": percentile(lags, 0.50),
            "p99_s": percentile(lags, 0.99),
            "max_s": max(lags),
        },
        "segments": float(raw["segments"]),
    }


def render(summary: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """The Markdown table."""
    lag = summary["lag"]
    return [
        f"### Relay lag under pgbench ({raw['segments']} segments; `pgbench -c 4 -j 2 "
        f"-T {raw['seconds']}` at scale {raw['scale']}, {raw['tps']:.0f} TPS)",
        "",
        "| from `wal.segment.closed` to `tier2.wal.relayed` | seconds |",
        "|---|---|",
        f"| p50 | {lag['p50_s']:.2f} |",
        f"| p99 | {lag['p99_s']:.2f} |",
        f"| max | {lag['max_s']:.2f} |",
        "",
    ]


def main() -> None:  # pragma: no cover - manual runs: python -m bench.relay_lag
    with Lab(quick=True) as lab:
        raw = run(lab, seconds=20, scale=5)
        print(json.dumps(summarize(raw), indent=2))


if __name__ == "__main__":
    main()
