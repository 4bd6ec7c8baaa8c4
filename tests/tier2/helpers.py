"""Tier-2 read-path tests: waiting for the relay, corrupting bucket objects, tier2-only configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from klio_dev import S3Server
from klio_dev.waiting import wait_until
from tests.fixtures.paths import BUCKET, KlioConfigWriter
from tests.relay.helpers import stream_events

WAL_RELAYED = "klio.main.tier2.wal.relayed"
BACKUP_RELAYED = "klio.main.tier2.backup.relayed"


def wait_relayed(nats_url: str, backup_id: str, last_segment: str, timeout: float = 180) -> None:
    """Wait for the relay's events: the backup's ``tier2.backup.relayed`` and the last segment's
    ``tier2.wal.relayed`` (the relay announces only after a HEAD verified the object)."""
    wait_until(
        lambda: any(e["backup_id"] == backup_id for e in stream_events(nats_url, BACKUP_RELAYED)),
        timeout,
        f"tier2.backup.relayed for {backup_id}",
    )
    wait_until(
        lambda: any(e["segment"] == last_segment for e in stream_events(nats_url, WAL_RELAYED)),
        timeout,
        f"tier2.wal.relayed for {last_segment}",
    )


def dr_config(
    klio_config: KlioConfigWriter,
    workdir: Path,
    pg: Any,
    s3: S3Server,
    keys: dict[str, Path],
    prefix: str = "",
) -> Path:
    """A disaster-recovery configuration: the bucket and the keys, no Tier 1, no NATS."""
    return klio_config(pg=pg, s3=s3, keys=keys, prefix=prefix, path=workdir / "dr.yaml")


def overwrite(s3: S3Server, key: str, data: bytes) -> None:
    """Replace an object in the bucket behind the relay's back (as a stray writer would)."""
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=data)


def flipped(data: bytes, *, from_end: int = 20) -> bytes:
    """``data`` with one byte flipped near its end (inside the last frame's payload)."""
    out = bytearray(data)
    out[len(out) - from_end] ^= 0x55
    return bytes(out)
