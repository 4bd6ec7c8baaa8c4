"""``klio backup list|show|run`` and ``klio verify`` against a real catalog."""

from __future__ import annotations

import json
import os
from datetime import datetime

import msgspec

from tests.restore.conftest import Backed
from tests.restore.helpers import catalog_parts, klio, output_of, store_backup
from tests.wal_receiver.helpers import close_segment, receiver_inprocess

LIST_KEYS = {"id", "status", "timeline", "start_lsn", "end_lsn", "start_time", "end_time"}


def test_list_show_and_a_running_backup(backed_up: Backed) -> None:
    b = backed_up
    done = klio(b.config, "backup", "list", "--json")
    assert done.returncode == 0, output_of(done)
    (doc,) = json.loads(done.stdout)
    assert LIST_KEYS | {"size", "stored_size"} <= set(doc)
    assert (doc["id"], doc["status"], doc["timeline"]) == (b.backup.id, "done", 1)
    assert (doc["start_lsn"], doc["end_lsn"]) == (b.backup.start_lsn, b.backup.end_lsn)
    assert datetime.fromisoformat(doc["end_time"]) == b.backup.end_time
    assert doc["size"] == b.backup.size > doc["stored_size"] > 0

    shown = json.loads(klio(b.config, "backup", "show", b.backup.id, "--json").stdout)
    assert shown["file_count"] == sum(1 for f in b.backup.files if f.type == "file")
    assert shown["dedup"]["chunks_total"] == b.backup.chunks_total
    assert shown["dedup"]["chunks_reused"] == b.backup.chunks_total - b.backup.chunks_new
    assert shown["wal"]["start_segment"] == b.backup.wal_start_segment
    text = klio(b.config, "backup", "show", "latest")
    assert text.returncode == 0 and b.backup.id in text.stdout, output_of(text)

    catalog, _ = catalog_parts(b.settings)
    catalog.begin("20990101T000000Z", request_id="r-1")  # a backup in progress: this process
    progress = {"phase": "streaming", "bytes_done": 300, "bytes_estimated": 1200}
    (catalog.backup_dir("20990101T000000Z") / "progress.json").write_bytes(
        msgspec.json.encode(progress)
    )
    docs = json.loads(klio(b.config, "backup", "list", "--json").stdout)
    assert [d["status"] for d in docs] == ["done", "running"]
    assert (docs[1]["bytes_done"], docs[1]["bytes_estimated"]) == (300, 1200)
    assert docs[1]["pid"] == os.getpid() and docs[1]["request_id"] == "r-1"
    running = klio(b.config, "backup", "show", "20990101T000000Z")
    assert "running (streaming)" in running.stdout and "(25%)" in running.stdout
    listing = klio(b.config, "backup", "list")
    assert "300 B / 1.2 KiB (25%)" in listing.stdout, output_of(listing)

    missing = klio(b.config, "backup", "show", "20000101T000000Z")
    assert missing.returncode == 1 and "HINT:" in missing.stderr


def test_verify_checks_crc32c_manifests_and_the_wal_range(backed_up: Backed) -> None:
    b = backed_up
    with receiver_inprocess(b.settings):
        crc = store_backup(b.pg, b.settings, b.area.parent, checksums="CRC32C")
        close_segment(b.pg, b.settings)
    for backup_id in (b.backup.id, crc.id):
        done = klio(b.config, "verify", "--backup", backup_id, "--json")
        assert done.returncode == 0, output_of(done)
        doc = json.loads(done.stdout)
        assert doc["ok"] and doc["problems"] == []
        assert doc["backup_manifest_files"] == doc["files"] - 1  # all but itself
        assert doc["wal_files"] >= 1
    newest = json.loads(klio(b.config, "verify", "--json").stdout)
    assert newest["backup_id"] == crc.id

    # A segment of the backup's WAL range goes missing: verify names it.
    archive_segment = b.settings.tier1.path / "main" / "wal"  # type: ignore[union-attr]
    name = crc.wal_start_segment
    (archive_segment / name[:16] / name).unlink()
    done = klio(b.config, "verify", "--backup", crc.id)
    assert done.returncode == 1 and f"{name}: WAL file {name} is not" in done.stdout, output_of(
        done
    )


def test_backup_run_without_the_service_times_out_clearly(backed_up: Backed) -> None:
    done = klio(backed_up.config, "backup", "run", "--timeout", "2", as_postgres=False)
    assert done.returncode == 1, output_of(done)
    assert "did not start a backup within 2 s" in done.stderr
    assert "HINT: is klio-basebackup running" in done.stderr
