"""Bad objects: a wrong bucket object is named by verify and restore; wal-restore falls back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from klio_common.storage.layout import chunk_path, wal_path
from klio_dev import PostgresServer
from tests.fixtures.paths import KlioConfigWriter
from tests.relay.helpers import announce_backup, bucket_bytes, relay_inprocess
from tests.restore.helpers import flip_byte, klio, output_of, store_backup
from tests.tier2.helpers import dr_config, flipped, overwrite, wait_relayed
from tests.wal_receiver.helpers import (
    archive_of,
    close_segment,
    keyring_of,
    load,
    postgres_dir,
    receiver_inprocess,
    wal_restore,
)

pytestmark = pytest.mark.integration


def test_bad_objects_are_named_and_wal_restore_falls_back(
    pg: PostgresServer,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, s3=s3_server, keys=keyring_files)
    settings = load(config)
    pg.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 20000) g")
    with receiver_inprocess(settings), relay_inprocess(settings):
        backup = store_backup(pg, settings, workdir)
        announce_backup(nats_server.url, backup)
        pg.execute("INSERT INTO t VALUES (0)")
        close_segment(pg, settings)
        archive = archive_of(settings)
        segments = archive.list_segments()
        wait_relayed(nats_server.url, backup.id, segments[-1].name)

    # wal-restore: a segment corrupted on Tier 1 is served, good, from the bucket.
    name = segments[-1].name
    good = archive.read(name, keyring_of(settings))
    flip_byte(archive.segment_path(name))
    dest = postgres_dir(workdir / "pg_wal") / "RECOVERYXLOG"
    done = wal_restore(config, name, dest, as_postgres=True, prefetch=0)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(good).digest()
    assert "the Tier-1 copy is unusable" in stderr and "restored from Tier 2" in stderr, stderr
    # A segment Tier 1 lacks comes from the bucket too; one neither tier has is "missing" (1).
    first = segments[0].name
    archive.segment_path(first).unlink()
    done = wal_restore(config, first, dest, as_postgres=True, prefetch=0)
    assert done.returncode == 0 and "restored from Tier 2" in done.stderr.decode()
    done = wal_restore(config, "00000001000000FF000000FF", dest, as_postgres=True, prefetch=0)
    assert done.returncode == 1, done.stderr.decode()
    # Corrupt in the bucket as well: recovery must stop (150), naming the object.
    key = f"main/{wal_path(name)}"
    overwrite(s3_server, key, flipped(bucket_bytes(s3_server, key)))
    done = wal_restore(config, name, dest, as_postgres=True, prefetch=0)
    assert done.returncode == 150 and key in done.stderr.decode(), done.stderr.decode()
    # An unreachable bucket is never "end of archive" (which would promote too early).
    s3_server.stop()
    done = wal_restore(config, "00000001000000FF000000FF", dest, as_postgres=True, prefetch=0)
    assert done.returncode == 150 and "unreachable" in done.stderr.decode(), done.stderr


def test_a_wrong_chunk_in_the_bucket_is_named_by_verify_and_restore(
    pg: PostgresServer,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, s3=s3_server, keys=keyring_files)
    settings = load(config)
    pg.execute("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 20000) g")
    with receiver_inprocess(settings), relay_inprocess(settings):
        backup = store_backup(pg, settings, workdir)
        announce_backup(nats_server.url, backup)
        close_segment(pg, settings)
        wait_relayed(nats_server.url, backup.id, archive_of(settings).list_segments()[-1].name)
    dr = dr_config(klio_config, workdir, pg, s3_server, keyring_files)
    assert klio(dr, "verify", "--tier", "2").returncode == 0

    # The right key, another chunk's (valid, decryptable) object: only the id check catches it.
    control = next(f for f in backup.files if f.path == "global/pg_control")
    other = next(f for f in backup.files if f.chunks and f.chunks[0] != control.chunks[0])
    key = f"main/{chunk_path(control.chunks[0])}"
    overwrite(s3_server, key, bucket_bytes(s3_server, f"main/{chunk_path(other.chunks[0])}"))

    verified = klio(dr, "verify", "--tier", "2", "--json")
    assert verified.returncode == 1, output_of(verified)
    problems = json.loads(verified.stdout)["problems"]
    assert [p["file"] for p in problems] == ["global/pg_control"], problems
    assert key in problems[0]["reason"] and "does not hold" in problems[0]["reason"], problems
    # Tier 1 still has the good chunk: verify of Tier 1 passes.
    assert klio(config, "verify", "--tier", "1").returncode == 0

    pgdata = postgres_dir(workdir / "area") / "pgdata"
    restored = klio(dr, "restore", "--tier", "2", "--pgdata", str(pgdata))
    assert restored.returncode == 1, output_of(restored)
    assert key in restored.stderr and "global/pg_control" in restored.stderr, output_of(restored)
    assert not pgdata.exists()  # a failed restore removes what it created
