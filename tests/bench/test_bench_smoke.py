"""``python -m bench.run --quick`` end to end against real PostgreSQL, nats-server and Klio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from klio_dev import scaled

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=scaled(480),
        check=False,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    [path] = list(results.glob("*.json"))
    doc = json.loads(path.read_text())

    assert list(doc["summary"]) == [
        "wal_ingest",
        "sync_standby",
        "wal_restore_cost",
        "backup",
        "replay",
    ]
    assert report.missing_figures(doc["summary"]) == []
    ratios = {k: v for k, v in report.figures(doc["summary"]).items() if ".ratio" in k}
    # ingest: 2; sync: one per variant (two Klio standbys, the control); backup: time, time
    # without the WAL wait, second-backup bytes, restore time; replay: 1
    sync = len(report.SYNC_VARIANTS)
    assert len(ratios) == 2 + sync + 2 * len(report.RESTORE_METHODS) + 4 + 1
    assert all(v > 0 for v in ratios.values()), ratios
    # Every receiver ingested the same WAL, and the encrypted archive is smaller than it.
    raw = doc["raw"]["wal_ingest"]
    assert raw["bytes"] >= 0.05 * 1e9
    assert 0 < raw["stored_bytes"]["klio_zstd_aes"] < raw["bytes"]
    assert doc["raw"]["wal_restore_cost"]["segments"] == len(
        doc["raw"]["wal_restore_cost"]["ms"]["klio_process"]
    )
    # The backups were compressed, the second one found changed pages and stored some bytes,
    # and recovery replayed every segment both ways.
    backup = doc["raw"]["backup"]
    [klio] = backup["backup"]["samples"]["klio"]
    assert 0 < klio["stored_bytes"] < klio["bytes"]
    assert backup["incremental"]["changed_pages"] > 0
    assert 0 < backup["incremental"]["added_bytes"] < klio["bytes"]
    assert [len(v) for v in doc["raw"]["replay"]["samples"].values()] == [1, 1]
    assert doc["raw"]["replay"]["segments"] >= 3
    # The printed report is the rendering of the saved document.
    assert report.render(doc) in done.stdout
    assert f"results: {path}" in done.stdout
