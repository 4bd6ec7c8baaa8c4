"""A tablespace backed up by the basebackup service and restored to a new location."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from klio_dev import PostgresServer
from klio_dev.postgres import run_as_postgres
from klio_dev.waiting import wait_until
from tests.basebackup.helpers import basebackup_inprocess, make_tablespace
from tests.fixtures.paths import KlioConfigWriter
from tests.restore.helpers import backup_now, klio, output_of, restore_server, wait_ready
from tests.wal_receiver.helpers import (
    close_segment,
    load,
    postgres_dir,
    receiver_inprocess,
)


def test_tablespace_is_restored_to_a_new_location(
    pg: PostgresServer,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    original = workdir / "ts"
    oid = make_tablespace(pg, original)
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, keys=keyring_files)
    settings = load(config)
    with receiver_inprocess(settings), basebackup_inprocess(settings):
        wait_ready(settings, "basebackup")
        backup = backup_now(config, settings)
        pg.execute("INSERT INTO in_ts VALUES (0, 'after the backup')")
        close_segment(pg, settings)
    assert [t.location for t in backup.tablespaces] == [str(original)]
    expected = pg.sql("SELECT count(*), sum(id) FROM in_ts")[0]
    before = sorted(str(p.relative_to(original)) for p in original.rglob("*"))

    area = postgres_dir(workdir / "area")
    # Unmapped, the tablespace would go to its original location: the primary's own (P11).
    refused = klio(config, "restore", "--pgdata", str(area / "refused"))
    assert refused.returncode == 1, output_of(refused)
    assert f"--tablespace-map {original}=" in refused.stderr, output_of(refused)
    assert not (area / "refused").exists()

    busy = area / "busy"
    busy.mkdir()
    (busy / "old").write_text("x")
    refused = klio(
        config,
        "restore",
        "--pgdata",
        str(area / "refused"),
        "--tablespace-map",
        f"{original}={busy}",
    )
    assert refused.returncode == 1 and "is not empty" in refused.stderr, output_of(refused)
    assert not (area / "refused").exists() and [p.name for p in busy.iterdir()] == ["old"]

    new = area / "relocated" / "ts"
    restored = restore_server(
        workdir,
        config,
        "tsrestored",
        "--tablespace-map",
        f"{original}={new}",
        verify_ignore=("pg_tblspc", "tablespace_map"),
    )
    server = restored.server
    assert restored.summary["tablespaces"] == {str(oid): str(new)}
    assert (server.data_dir / "tablespace_map").read_text() == f"{oid} {new}\n"
    assert not (server.data_dir / "pg_tblspc" / str(oid)).exists()  # PostgreSQL links it
    assert new.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in new.iterdir()) == [n for n in before if "/" not in n]
    try:
        server.start()
        wait_until(lambda: server.sql("SELECT NOT pg_is_in_recovery()")[0][0], 120, "promotion")
        assert server.sql("SELECT count(*), sum(id) FROM in_ts")[0] == expected
        location = server.sql(f"SELECT pg_tablespace_location({oid})")[0][0]
        assert location == str(new)
        assert (server.data_dir / "pg_tblspc" / str(oid)).readlink() == new
        amcheck = run_as_postgres(
            ["pg_amcheck", "--all", "--install-missing", *server._client_args()], check=False
        )
        assert amcheck.returncode == 0, amcheck.stdout + amcheck.stderr
    finally:
        server.stop("immediate")
    # The primary's tablespace was never touched.
    assert sorted(str(p.relative_to(original)) for p in original.rglob("*")) == before
    assert pg.sql("SELECT count(*), sum(id) FROM in_ts")[0] == expected
