"""Both tiers after backups and a failover: each policy expires what it should, frees what the plan
said, opens no WAL gap, and every tier still restores to a point inside its window."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from klio_common.storage.layout import manifest_path, wal_path
from klio_common.storage.tier2state import Tier2State
from klio_dev import PostgresServer, S3Server, ServerError
from klio_dev.waiting import wait_until
from tests.basebackup.helpers import basebackup_inprocess, catalog_of, events
from tests.fixtures.paths import KlioConfigWriter
from tests.relay.helpers import relay_inprocess
from tests.restore.helpers import backup_now, klio, output_of, restore_server, wait_ready
from tests.retention.helpers import backdate, bucket_sizes, retention, tier1_bytes
from tests.tier2.helpers import dr_config
from tests.wal_receiver.helpers import (
    archive_of,
    close_segment,
    load,
    receiver_inprocess,
    wait_closed,
)

pytestmark = pytest.mark.integration
POLICIES = {"tier1": "RECOVERY WINDOW OF 2 DAYS", "tier2": "REDUNDANCY 4"}


def _marker(pg: PostgresServer, row: int, tli: int) -> str:
    pg.execute("INSERT INTO marker VALUES (%s, %s)", (row, tli))
    return str(pg.sql("SELECT pg_current_wal_insert_lsn()::text")[0][0])


def _restore_and_count(
    workdir: Path, config: Path, name: str, *args: str
) -> tuple[list[tuple[int, int]], str, str]:
    """Restore, recover and promote; the marker rows, the backup used and the server's log."""
    restored = restore_server(workdir, config, name, *args)
    server = restored.server
    try:
        server.start()
        wait_until(lambda: server.sql("SELECT NOT pg_is_in_recovery()")[0][0], 120, name)
        rows = [(r[0], r[1]) for r in server.sql("SELECT id, tli FROM marker ORDER BY id")]
        return rows, restored.summary["backup_id"], server.log_path.read_text()
    finally:
        try:
            server.stop("immediate")
        except ServerError:
            server.kill()


def test_each_tier_expires_its_own_and_still_restores_across_the_failover(
    pg: PostgresServer,
    nats_server: Any,
    s3_server: S3Server,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    common = {
        "nats": nats_server,
        "tier1": tier1_dir,
        "keys": keyring_files,
        "s3": s3_server,
        "cluster": {"retention": POLICIES},
        "extra": {"retention": {"chunk_grace": 0}},
    }
    standby = pg.make_standby("standby")
    config = klio_config(pg=pg, **common)
    settings = load(config)
    pg.execute("CREATE TABLE marker (id int PRIMARY KEY, tli int)")
    ids: list[str] = []
    with receiver_inprocess(settings), basebackup_inprocess(settings):
        wait_ready(settings, "basebackup")
        for row in (1, 2, 3):
            _marker(pg, row, 1)
            ids.append(backup_now(config, settings).id)
        end = pg.current_lsn()
        pg.switch_wal()
        wait_closed(settings, end)
    wait_until(
        lambda: standby.sql("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(end),))[0][0],
        60,
        "the standby to replay the primary's WAL",
    )
    pg.stop()
    standby.promote()
    wait_until(lambda: standby.sql("SELECT NOT pg_is_in_recovery()")[0][0], 60, "promotion")
    standby.execute("SELECT pg_create_physical_replication_slot('klio', true)")
    config2 = klio_config(pg=standby, path=workdir / "klio2.yaml", **common)
    settings2 = load(config2)
    with receiver_inprocess(settings2), basebackup_inprocess(settings2):
        wait_ready(settings2, "basebackup")
        for row in (4, 5):
            _marker(standby, row, 2)
            ids.append(backup_now(config2, settings2).id)
        target = _marker(standby, 6, 2)
        _marker(standby, 7, 2)
        close_segment(standby, settings2)
    assert [m.timeline for m in catalog_of(settings2).manifests()] == [1, 1, 1, 2, 2]

    # Ages are constructed: 4.5, 3.5, 2.5, 1.5 and 0.5 days.
    for backup_id, days in zip(ids, (4.5, 3.5, 2.5, 1.5, 0.5), strict=True):
        backdate(settings2, backup_id, timedelta(days=days))
    journal = Tier2State(tier1_dir / "main")
    archive = archive_of(settings2)

    def everything_relayed() -> bool:
        journal.load()
        wal = [wal_path(n) for n, _ in archive.iter_segment_files()]
        wal += [wal_path(f"{t:08X}.history") for t in archive.list_history()]
        return all(manifest_path(b) in journal for b in ids) and all(p in journal for p in wal)

    with relay_inprocess(settings2):
        wait_until(everything_relayed, 180, "every backup and WAL file in the bucket")

    tier1_plan, tier2_plan = retention(config2, "plan")
    assert tier1_plan["expire"] == ids[:2], tier1_plan["backups"]
    assert tier2_plan["expire"] == ids[:1], tier2_plan["backups"]
    kept = {b["id"]: b["reason"] for b in tier1_plan["backups"] if b["action"] == "keep"}
    assert kept[ids[2]].startswith("the newest backup ending before the window"), kept
    assert tier1_plan["wal"]["count"] > 0 and tier2_plan["wal"]["count"] > 0
    assert tier1_plan["chunks"]["count"] > 0
    assert tier1_plan["held"] == []

    before = tier1_bytes(settings2)
    [applied1] = retention(config2, "apply", "--tier", "1")
    assert applied1["expired"] == ids[:2]
    assert before - tier1_bytes(settings2) == tier1_plan["bytes"] == applied1["bytes_freed"]
    # Tier 1 no longer protects the chunks only the expired backups used: plan Tier 2 again.
    [tier2_plan] = retention(config2, "plan", "--tier", "2")
    assert tier2_plan["expire"] == ids[:1]
    before = sum(bucket_sizes(s3_server).values())
    [applied2] = retention(config2, "apply", "--tier", "2")
    assert applied2["expired"] == ids[:1]
    assert applied2["refused"] == []
    freed = before - sum(bucket_sizes(s3_server).values())
    assert freed == tier2_plan["bytes"] == applied2["bytes_freed"]

    assert catalog_of(settings2).ids() == sorted(ids[2:])
    in_bucket = {k.split("/")[2] for k in bucket_sizes(s3_server) if k.endswith("/manifest")}
    assert in_bucket == set(ids[1:])
    expired = events(nats_server.url, "klio.main.retention.backup.expired")
    assert sorted((e["tier"], e["backup_id"]) for e in expired) == [
        (1, ids[0]),
        (1, ids[1]),
        (2, ids[0]),
    ]
    assert events(nats_server.url, "klio.main.retention.wal.pruned")

    verify = klio(config2, "wal", "verify")
    assert verify.returncode == 0, output_of(verify)
    assert "gap" not in verify.stdout.lower() or "no gap" in verify.stdout.lower()

    # Tier 1: from its oldest kept backup (timeline 1) across the switch to a point on timeline 2.
    rows, used, _ = _restore_and_count(
        workdir, config2, "t1", "--backup", ids[2], "--target-lsn", target
    )
    assert rows == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert used == ids[2]
    # Tier 2: a backup Tier 1 no longer has, from a configuration naming only the bucket, so
    # both the base backup and every WAL file (the history file too) come from Tier 2.
    assert not (tier1_dir / "main" / manifest_path(ids[1])).exists()
    bucket_only = dr_config(klio_config, workdir, standby, s3_server, keyring_files)
    rows, used, log = _restore_and_count(
        workdir, bucket_only, "t2", "--tier", "2", "--backup", ids[1], "--target-lsn", target
    )
    assert rows == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert used == ids[1]
    fetched = set(re.findall(r"([0-9A-F]{8})[0-9A-F]{16} restored from Tier 2", log))
    assert fetched == {"00000001", "00000002"}, log[-3000:]
    assert "00000002.history restored from Tier 2" in log, log[-3000:]
