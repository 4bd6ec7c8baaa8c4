"""The klio-retention service: runs at start and after each backup.done, announces, counts."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest

from klio_dev.waiting import wait_until
from klio_retention.service import SERVICE, main
from tests.basebackup.helpers import catalog_of, events
from tests.fixtures.paths import KlioConfigWriter
from tests.relay.helpers import announce_backup
from tests.retention.helpers import synthetic_cluster
from tests.services import service_inprocess
from tests.wal_receiver.helpers import archive_of, load

pytestmark = pytest.mark.integration


def _metric(settings: Any, name: str) -> float:
    port = settings.service(SERVICE).http_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and 'cluster="main"' in line and 'tier="1"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_runs_at_start_and_after_each_backup(
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    cluster = {
        "name": "main",
        "conninfo": "host=/nonexistent",
        "retention": {"tier1": "REDUNDANCY 2"},
    }
    config = klio_config(
        nats=nats_server,
        tier1=tier1_dir,
        keys=keyring_files,
        extra={"clusters": [cluster], "retention": {"chunk_grace": 0, "interval": 3600}},
    )
    settings = load(config)
    b1, b2, b3 = synthetic_cluster(settings, [2, 4, 6])
    catalog = catalog_of(settings)
    with service_inprocess(SERVICE, main, settings):
        wait_until(lambda: catalog.ids() == [b2, b3], 60, "the first run to expire b1")
        wait_until(lambda: events(nats_server.url, "klio.main.retention.>"), 60, "its events")
        [b4] = synthetic_cluster(settings, [8], first=4, wal=range(0))
        manifest = catalog.load(b4)
        # The interval is an hour: only backup.done can make it run again now.
        announce_backup(nats_server.url, manifest)
        wait_until(lambda: catalog.ids() == [b3, b4], 60, "backup.done to expire b2")
        wait_until(
            lambda: _metric(settings, "klio_retention_backups_expired_total") == 2,
            30,
            "the metrics",
        )
        assert _metric(settings, "klio_retention_wal_segments_pruned_total") == 5
        assert _metric(settings, "klio_retention_chunks_deleted_total") == 2
        assert _metric(settings, "klio_retention_bytes_freed_total") > 0
    expired = events(nats_server.url, "klio.main.retention.backup.expired")
    assert [(e["backup_id"], e["tier"], e["reason"]) for e in expired] == [
        (b1, 1, "beyond REDUNDANCY 2"),
        (b2, 1, "beyond REDUNDANCY 2"),
    ]
    pruned = events(nats_server.url, "klio.main.retention.wal.pruned")
    names = [n for n, _ in archive_of(settings).iter_segment_files()]
    assert min(names) == "000000010000000000000006"
    assert [(p["first_segment"], p["last_segment"], p["count"]) for p in pruned] == [
        ("000000010000000000000001", "000000010000000000000003", 3),
        ("000000010000000000000004", "000000010000000000000005", 2),
    ]
