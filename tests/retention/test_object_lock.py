"""Tier 2 under object lock: what cannot be deleted yet is reported as held, and the run goes on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from klio_common.pg.walname import WalSegment
from klio_common.storage.layout import manifest_path, wal_path
from klio_common.storage.tier2state import Tier2State
from klio_dev import S3Server
from klio_dev.waiting import wait_until
from tests.fixtures.paths import KlioConfigWriter
from tests.relay.helpers import load, relay_inprocess
from tests.retention.helpers import SEG, retention, synthetic_cluster

pytestmark = pytest.mark.integration
LOCKED = "klio-locked"
NOW = datetime.now(UTC)


def test_locked_objects_are_held_and_reported(
    nats_server: Any,
    s3_server: S3Server,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket=LOCKED, ObjectLockEnabledForBucket=True)
    cluster = {
        "name": "main",
        "conninfo": "host=/nonexistent",
        "retention": {"tier2": "REDUNDANCY 1"},
    }
    config = klio_config(
        nats=nats_server,
        tier1=tier1_dir,
        s3=s3_server,
        bucket=LOCKED,
        keys=keyring_files,
        extra={"clusters": [cluster], "retention": {"chunk_grace": 0}},
    )
    settings = load(config)
    b1, b2, b3 = synthetic_cluster(settings, [2, 4, 6])
    journal = Tier2State(tier1_dir / "main")

    def relayed() -> bool:
        journal.load()
        return all(manifest_path(b) in journal for b in (b1, b2, b3))

    with relay_inprocess(settings):
        wait_until(relayed, 120, "the three backups in the bucket")
    first_wal = wal_path(WalSegment(1, 1, SEG).name)
    until = NOW + timedelta(days=1)
    client.put_object_retention(
        Bucket=LOCKED,
        Key=f"main/{manifest_path(b1)}",
        Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until},
    )
    client.put_object_legal_hold(Bucket=LOCKED, Key=f"main/{first_wal}", LegalHold={"Status": "ON"})

    [doc] = retention(config, "plan", "--tier", "2")
    fates = {b["id"]: (b["action"], b["reason"]) for b in doc["backups"]}
    assert fates[b1][0] == "hold" and "object lock (GOVERNANCE)" in fates[b1][1], fates
    assert fates[b2] == ("expire", "beyond REDUNDANCY 1"), fates
    assert fates[b3][0] == "keep", fates
    assert {"path": first_wal, "reason": "under an object lock legal hold"} in doc["held"]
    assert doc["wal"]["count"] == 0  # the locked first segment holds the ones after it

    [done] = retention(config, "apply", "--tier", "2")
    assert done["expired"] == [b2]
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=LOCKED)["Contents"]}
    assert f"main/{manifest_path(b1)}" in listed
    assert f"main/{manifest_path(b2)}" not in listed
    assert f"main/{manifest_path(b3)}" in listed
    assert f"main/{first_wal}" in listed
    # Every chunk stays: b1 is held, and Tier 1 still keeps b2 (the relay may need its chunks).
    chunk_keys = {k for k in listed if "/chunks/" in k and not k.endswith("dedup.key")}
    assert len(chunk_keys) == 4
    assert done["chunks_deleted"] == 0
    tombstones = (tier1_dir / "main" / "tier2" / "deleted").read_text()
    assert manifest_path(b2) in tombstones
