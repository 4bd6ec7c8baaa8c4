"""A backup running while retention expires everything older: it completes, and it restores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from klio_dev import PostgresServer, ServerError
from klio_dev.waiting import wait_until
from tests.basebackup.helpers import basebackup_inprocess, catalog_of, store_of
from tests.fixtures.paths import KlioConfigWriter
from tests.restore.helpers import backup_now, klio, output_of, restore_server, wait_ready
from tests.retention.helpers import keep_one_backup, retention
from tests.wal_receiver.helpers import close_segment, receiver_inprocess

pytestmark = pytest.mark.integration


def _waiting_for_wal(settings: Any) -> str | None:
    """The id of a backup whose data is in the store and that now waits for its WAL."""
    for lease in catalog_of(settings).leases():
        progress = catalog_of(settings).backup_dir(lease.id) / "progress.json"
        try:
            if json.loads(progress.read_text())["phase"] == "waiting for WAL":
                return lease.id
        except (FileNotFoundError, ValueError):
            continue
    return None


def test_a_running_backup_survives_retention_and_restores(
    pg: PostgresServer,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    config, settings = keep_one_backup(klio_config, pg, nats_server, tier1_dir, keyring_files)
    with basebackup_inprocess(settings):
        wait_ready(settings, "basebackup")
        with receiver_inprocess(settings):
            first = backup_now(config, settings).id
            pg.execute("UPDATE t SET v = md5(v) WHERE id % 2 = 0")
            second = backup_now(config, settings).id
        # Without the receiver the next backup streams its data, then waits for its WAL.
        pg.execute("UPDATE t SET v = md5(v || 'x') WHERE id % 3 = 0")
        started = klio(config, "backup", "run", as_postgres=False)
        assert started.returncode == 0, output_of(started)
        running = wait_until(lambda: _waiting_for_wal(settings), 120, "a backup waiting for WAL")

        [applied] = retention(config, "apply", "--tier", "1")
        assert applied["expired"] == [first]
        assert applied["chunks_deleted"] == 0
        assert any(running in reason for reason in applied["chunks_held"]), applied

        with receiver_inprocess(settings):
            wait_until(lambda: running in catalog_of(settings).ids(), 120, f"{running} committed")
            expected = pg.sql("SELECT count(*), md5(string_agg(v, ',' ORDER BY id)) FROM t")[0]
            close_segment(pg, settings)

    [applied] = retention(config, "apply", "--tier", "1")
    assert applied["expired"] == [second]
    assert applied["chunks_deleted"] > 0
    store = store_of(settings)
    for entry in catalog_of(settings).load(running).files:
        for chunk in entry.chunks:
            assert store.path(chunk).exists(), (entry.path, chunk)

    restored = restore_server(workdir, config, "restored", "--backup", running)
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
