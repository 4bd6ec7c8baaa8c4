"""kill -9 of a retention run mid-apply: the catalog stays consistent and the next run finishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from klio_common.catalog.chunks import ChunkStore
from klio_dev import PostgresServer, ServerError
from klio_dev.waiting import wait_until
from tests.basebackup.helpers import catalog_of, events, store_of
from tests.fixtures.paths import KlioConfigWriter
from tests.restore.helpers import klio, output_of, restore_server
from tests.retention.helpers import (
    keep_one_backup,
    one_shot,
    process_state,
    retention,
    three_backups,
    tier1_bytes,
)

pytestmark = pytest.mark.integration


def _listed_backups_are_whole(settings: Any) -> None:
    store: ChunkStore = store_of(settings)
    for manifest in catalog_of(settings).manifests():
        for entry in manifest.files:
            for chunk in entry.chunks:
                assert store.path(chunk).exists(), (manifest.id, entry.path, chunk)


@pytest.mark.parametrize("point", ["manifests", "wal"])
def test_kill_mid_apply_then_the_next_run_finishes(
    pg: PostgresServer,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
    point: str,
) -> None:
    config, settings = keep_one_backup(klio_config, pg, nats_server, tier1_dir, keyring_files)
    ids = three_backups(pg, config, settings)
    expected = pg.sql("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t")[0]

    [planned] = retention(config, "plan", "--tier", "1")
    assert planned["expire"] == ids[:2]
    assert planned["wal"]["count"] > 0 and planned["chunks"]["count"] > 0, planned
    before = tier1_bytes(settings)

    proc = one_shot(config, "apply", "--tier", "1", env={"KLIO_RETENTION_FAULT_POINT": point})
    try:
        wait_until(lambda: process_state(proc.pid) == "T", 60, f"the run to reach {point}")
    finally:
        proc.kill()
        proc.communicate(timeout=30)

    # Consistent: only the kept backup is listed, and it lacks nothing; WAL has no gap.
    assert catalog_of(settings).ids() == [ids[2]]
    _listed_backups_are_whole(settings)
    verify = klio(config, "wal", "verify")
    assert verify.returncode == 0, output_of(verify)
    assert before - tier1_bytes(settings) < planned["bytes"]  # garbage left, nothing more

    [finished] = retention(config, "apply", "--tier", "1")
    assert finished["expired"] == []
    assert finished["chunks_deleted"] == planned["chunks"]["count"]
    if point == "manifests":
        assert finished["wal_deleted"] == planned["wal"]["count"]
    assert before - tier1_bytes(settings) == planned["bytes"]
    [after] = retention(config, "plan", "--tier", "1")
    assert (after["expire"], after["wal"]["count"], after["chunks"]["count"]) == ([], 0, 0)
    # The killed run's announcements were durable: the next run published them.
    expired = events(nats_server.url, "klio.main.retention.backup.expired")
    assert sorted(e["backup_id"] for e in expired) == ids[:2]

    restored = restore_server(workdir, config, "after-crash", "--backup", ids[2])
    server = restored.server
    try:
        server.start()
        wait_until(lambda: server.sql("SELECT NOT pg_is_in_recovery()")[0][0], 120, "promotion")
        got = server.sql("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t")[0]
        assert got == expected
    finally:
        try:
            server.stop("immediate")
        except ServerError:
            server.kill()
