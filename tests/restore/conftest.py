"""A small cluster with one backup in the catalog and its WAL archived, for the restore tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from klio_common.catalog.backups import BackupManifest
from klio_common.runtime.settings import Settings
from klio_dev import PostgresServer
from tests.fixtures.paths import KlioConfigWriter
from tests.restore.helpers import store_backup
from tests.wal_receiver.helpers import (
    close_segment,
    load,
    postgres_dir,
    receiver_inprocess,
)


@dataclass(frozen=True)
class Backed:
    """A primary, its Klio configuration, one committed backup, and a place to restore to."""

    pg: PostgresServer
    config: Path
    settings: Settings
    backup: BackupManifest
    area: Path  # owned by the postgres OS user: restores go below it


@pytest.fixture
def backed_up(
    pg: PostgresServer,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> Backed:
    """One backup (pg_basebackup through the catalog helper) of a small table, WAL archived."""
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, keys=keyring_files)
    settings = load(config)
    pg.execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 50000) g"
    )
    with receiver_inprocess(settings):
        backup = store_backup(pg, settings, workdir)
        pg.execute("INSERT INTO t VALUES (0, 'after the backup')")
        close_segment(pg, settings)
    return Backed(pg, config, settings, backup, postgres_dir(workdir / "area"))
