"""Disaster recovery from the bucket alone: Tier 1 deleted, list, verify and restore from Tier 2."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from klio_dev import PostgresServer
from klio_dev.postgres import run_as_postgres
from klio_dev.waiting import wait_until
from tests.basebackup.helpers import basebackup_inprocess
from tests.fixtures.paths import KlioConfigWriter
from tests.relay.helpers import relay_inprocess
from tests.restore.helpers import backup_now, klio, output_of, restore_server, wait_ready
from tests.restore.test_drill import mark
from tests.tier2.helpers import dr_config, wait_relayed
from tests.wal_receiver.helpers import (
    archive_of,
    close_segment,
    load,
    receiver_inprocess,
)

pytestmark = pytest.mark.integration


def test_restore_from_the_bucket_alone(
    pg: PostgresServer,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    config = klio_config(
        pg=pg,
        nats=nats_server,
        tier1=tier1_dir,
        s3=s3_server,
        keys=keyring_files,
        prefix="prod/",
        extra={"relay": {"reconcile_interval": 30}},
    )
    settings = load(config)
    pg.execute("CREATE TABLE marker (id int PRIMARY KEY)")
    with (
        receiver_inprocess(settings),
        basebackup_inprocess(settings),
        relay_inprocess(settings),
    ):
        wait_ready(settings, "basebackup")
        pg.pgbench_init(scale=5)
        load_run = threading.Thread(target=pg.pgbench, args=(2,), kwargs={"seconds": 6})
        load_run.start()
        marks = {row: mark(pg, row) for row in (1, 2)}
        backup = backup_now(config, settings)  # under load
        for row in range(3, 11):
            marks[row] = mark(pg, row)
        load_run.join(120)
        close_segment(pg, settings)
        last = archive_of(settings).list_segments()[-1].name
        wait_relayed(nats_server.url, backup.id, last)

    shutil.rmtree(tier1_dir)
    wrong = dr_config(klio_config, workdir, pg, s3_server, keyring_files)
    unlisted = klio(wrong, "backup", "list", "--tier", "2")
    assert unlisted.returncode == 1 and "no identity.json" in unlisted.stderr, output_of(unlisted)
    dr = dr_config(klio_config, workdir, pg, s3_server, keyring_files, prefix="prod")

    listed = klio(dr, "backup", "list", "--tier", "2", "--json")
    assert listed.returncode == 0, output_of(listed)
    docs = json.loads(listed.stdout)
    assert [(d["id"], d["status"]) for d in docs] == [(backup.id, "done")]
    assert docs[0]["end_lsn"] == backup.end_lsn and docs[0]["size"] == backup.size
    # Without --tier, a configuration with only tier2 reads the bucket too.
    shown = klio(dr, "backup", "show", "latest", "--json")
    assert shown.returncode == 0, output_of(shown)
    assert json.loads(shown.stdout)["id"] == backup.id

    verified = klio(dr, "verify", "--tier", "2", "--json")
    assert verified.returncode == 0, output_of(verified)
    report = json.loads(verified.stdout)
    assert report["ok"] and report["backup_id"] == backup.id, report
    assert report["wal_files"] >= 1 and report["backup_manifest_files"] == report["files"] - 1

    restored = restore_server(
        workdir, dr, "dr", "--tier", "2", "--target-time", marks[6].after_time
    )
    assert restored.summary["backup_id"] == backup.id
    auto = (restored.server.data_dir / "postgresql.auto.conf").read_text()
    assert str(dr) in auto  # its restore_command reads the bucket: Tier 1 is gone
    server = restored.server
    try:
        server.start()
        wait_until(lambda: server.sql("SELECT NOT pg_is_in_recovery()")[0][0], 180, "promotion")
        log = server.log_path.read_text()
        assert "recovery stopping before commit" in log, log[-3000:]
        assert "restored from Tier 2" in log, log[-3000:]
        rows = [r[0] for r in server.sql("SELECT id FROM marker ORDER BY id")]
        assert rows == list(range(1, 7))
        amcheck = run_as_postgres(
            ["pg_amcheck", "--all", "--install-missing", *server._client_args()], check=False
        )
        assert amcheck.returncode == 0, amcheck.stdout + amcheck.stderr
    finally:
        server.stop("immediate")
    assert not tier1_dir.exists()  # the read path wrote nothing back
