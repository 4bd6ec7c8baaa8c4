"""The benchmark report: medians, ratios, required figures and the Markdown tables."""

from __future__ import annotations

from typing import Any

import pytest

from bench import report


def _ingest() -> dict[str, Any]:
    return {
        "bytes": 100_000_000,
        "samples": {
            "pg_receivewal": [
                {"seconds": 1.0, "cpu_seconds": 0.5},
                {"seconds": 2.0, "cpu_seconds": 0.5},
                {"seconds": 4.0, "cpu_seconds": 0.5},
            ],
            "klio_zstd_aes": [
                {"seconds": 0.5, "cpu_seconds": 0.5, "startup_seconds": 0.25},
                {"seconds": 1.0, "cpu_seconds": 0.8, "startup_seconds": 0.5},
                {"seconds": 9.0, "cpu_seconds": 0.9, "startup_seconds": 0.1},
            ],
            "klio_none": [
                {"seconds": 2.0, "cpu_seconds": 0.2},
                {"seconds": 2.0, "cpu_seconds": 0.2},
                {"seconds": 2.0, "cpu_seconds": 0.2},
            ],
        },
        "stored_bytes": {"pg_receivewal": 100_000_000, "klio_zstd_aes": 40_000_000},
    }


def _sync() -> dict[str, Any]:
    return {
        "pgbench": "-c 4 -j 2 -T 30",
        "samples": {
            "pg_receivewal": [
                {"tps": 1000.0, "cpu_seconds": 3.0, "seconds": 30.0},
                {"tps": 1500.0, "cpu_seconds": 3.0, "seconds": 30.0},
                {"tps": 900.0, "cpu_seconds": 3.0, "seconds": 30.0},
            ],
            "klio": [
                {"tps": 1200.0, "cpu_seconds": 6.0, "seconds": 30.0},
                {"tps": 1800.0, "cpu_seconds": 6.0, "seconds": 30.0},
                {"tps": 450.0, "cpu_seconds": 6.0, "seconds": 30.0},
            ],
            "klio_plain": [
                {"tps": 1100.0, "cpu_seconds": 5.0, "seconds": 30.0},
                {"tps": 1500.0, "cpu_seconds": 5.0, "seconds": 30.0},
                {"tps": 900.0, "cpu_seconds": 5.0, "seconds": 30.0},
            ],
            "pg_receivewal_control": [
                {"tps": 950.0, "cpu_seconds": 3.0, "seconds": 30.0},
                {"tps": 1500.0, "cpu_seconds": 3.0, "seconds": 30.0},
                {"tps": 990.0, "cpu_seconds": 3.0, "seconds": 30.0},
            ],
        },
    }


def _restore() -> dict[str, Any]:
    ms = {m: [10.0, 20.0, 60.0] for m in report.RESTORE_METHODS}
    ms["cp"] = [5.0, 10.0, 15.0]
    return {"segments": 3, "stored_bytes": 24_000_000, "ms": ms, "cpu_ms": {"cp": 30.0}}


def test_median_and_mean() -> None:
    assert report.median([3.0, 1.0, 2.0]) == 2.0
    assert report.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert report.mean([1.0, 2.0, 6.0]) == 3.0
    with pytest.raises(ValueError, match="no values"):
        report.median([])
    with pytest.raises(ValueError, match="no values"):
        report.mean([])


def test_ratio_refuses_a_non_positive_baseline() -> None:
    assert report.ratio(3.0, 2.0) == 1.5
    with pytest.raises(ValueError, match="baseline"):
        report.ratio(1.0, 0.0)


def test_ingest_median_throughput_and_ratio() -> None:
    summary = report.summarize_ingest(_ingest())
    # 100 MB in 1, 2, 4 s -> 100, 50, 25 MB/s: the median rate, not the rate of the median time
    assert summary["pg_receivewal"]["median_mb_s"] == 50.0
    assert summary["klio_zstd_aes"]["median_mb_s"] == 100.0
    assert summary["klio_none"]["median_mb_s"] == 50.0
    assert summary["ratio"] == {"klio_zstd_aes": 2.0, "klio_none": 1.0}
    assert summary["klio_zstd_aes"]["median_cpu_seconds"] == 0.8
    assert summary["klio_none"]["cpu_pct"] == pytest.approx(10.0)
    assert "pg_receivewal" not in summary["ratio"]
    # start-up is measured for Klio only: 100 MB in 0.25, 0.5, 8.9 s once connected
    assert summary["klio_zstd_aes"]["median_startup_seconds"] == 0.25
    assert summary["klio_zstd_aes"]["median_mb_s_after_startup"] == 200.0
    assert "median_startup_seconds" not in summary["pg_receivewal"]


def test_sync_median_tps_and_ratio() -> None:
    summary = report.summarize_sync(_sync())
    assert summary["klio"]["median_tps"] == 1200.0
    assert summary["ratio"] == {
        "klio": pytest.approx(1.2),
        "klio_plain": pytest.approx(1.1),
        "pg_receivewal_control": pytest.approx(0.99),
    }
    assert summary["pg_receivewal"]["cpu_pct"] == pytest.approx(10.0)
    # the machine drifted (900 to 1500 TPS): each pair of adjacent runs compares like with like
    assert summary["pairs"]["klio"] == [pytest.approx(1.2), pytest.approx(1.2), pytest.approx(0.5)]
    assert summary["median_pair"]["klio"] == pytest.approx(1.2)
    lines = report.render_sync(summary, _sync())
    assert "Klio, pair by pair (adjacent runs): 1.20, 1.20, 0.50; median pair 1.20×." in lines
    assert summary["median_pair"]["klio_plain"] == pytest.approx(1.0)
    plain = "Klio, no encryption, pair by pair (adjacent runs): 1.10, 1.00, 1.00; median pair 1.00×"
    assert plain + "." in lines
    # the baseline against itself: the spread two identical standbys give on this machine
    control = "pg_receivewal again, pair by pair (adjacent runs): 0.95, 1.00, 1.10"
    control += "; median pair 1.00×"
    assert control + "." in lines
    assert "pg_receivewal again (control: the baseline against itself)" in "\n".join(lines)


def test_restore_costs_and_ratios_to_cp() -> None:
    summary = report.summarize_restore(_restore())
    assert summary["cp"] == {"mean_ms": 10.0, "median_ms": 10.0, "cpu_ms_per_call": 10.0}
    assert summary["klio_process"]["mean_ms"] == 30.0
    assert summary["ratio_mean"]["klio_process"] == 3.0
    assert summary["ratio_median"]["klio_process"] == 2.0
    assert "cp" not in summary["ratio_median"]


def test_a_complete_summary_misses_no_figure() -> None:
    raw = {"wal_ingest": _ingest(), "sync_standby": _sync(), "wal_restore_cost": _restore()}
    summary = report.summarize(raw)
    assert report.missing_figures(summary) == []
    flat = report.figures(summary)
    assert flat["wal_ingest.ratio.klio_zstd_aes"] == 2.0
    assert flat["wal_restore_cost.cp.mean_ms"] == 10.0


def test_missing_figures_are_named() -> None:
    raw = _ingest()
    del raw["samples"]["klio_none"]
    missing = report.missing_figures(report.summarize({"wal_ingest": raw}))
    assert "wal_ingest.klio_none.median_mb_s" in missing
    assert "wal_ingest.ratio.klio_none" in missing
    assert not [m for m in missing if "klio_zstd_aes" in m]


def test_required_figures_follow_the_benchmarks_run() -> None:
    only = report.required_figures(["sync_standby"])
    assert "sync_standby.ratio.klio" in only
    assert "sync_standby.median_pair.klio_plain" in only
    assert "sync_standby.median_pair.pg_receivewal_control" in only
    assert not [f for f in only if not f.startswith("sync_standby.")]


def test_render_has_a_table_per_benchmark() -> None:
    raw = {"wal_ingest": _ingest(), "sync_standby": _sync(), "wal_restore_cost": _restore()}
    doc = {
        "date": "2026-01-02 03:04 UTC",
        "machine": {
            "nproc": 2,
            "cpu": "Test CPU",
            "memory_gb": 24.0,
            "kernel": "Linux 6",
            "postgresql": "15.20",
            "python": "3.11.2",
            "loadavg_start": 0.5,
            "loadavg_end": 2.25,
        },
        "options": {"runs": 3},
        "raw": raw,
        "summary": report.summarize(raw),
    }
    text = report.render(doc)
    assert "2 CPU (Test CPU), 24 GB RAM" in text
    assert "load average 0.5 at the start, 2.2 at the end" in text
    assert (
        f"| {report.LABELS['klio_zstd_aes']} | 100.0 | 1.00 | 0.25 | 200.0 | 80% | 40 | 2.00× |"
    ) in text
    assert f"| {report.LABELS['klio']} | 1200 | 20% | 1.20× |" in text
    assert "| `klio wal-restore` (process) | 30.0 | 20.0 | — | 3.00× | 2.00× |" in text
    assert "| pg_receivewal | 50.0 | 2.00 | — | — | 25% | 100 | 1.00× (baseline) |" in text
    assert "(3 runs each)" in text
    assert "(-c 4 -j 2 -T 30, 3 runs each)" in text
    assert "stored 8.0 MB each" in text


def _backup() -> dict[str, Any]:
    def klio(seconds: float, wait: float) -> dict[str, float]:
        return {"seconds": seconds, "wal_wait_seconds": wait, "cpu_seconds": seconds, "bytes": 100}

    return {
        "cluster": {"bytes": 1_200_000_000},
        "backup": {
            "samples": {
                "pg_basebackup": [{"seconds": 4.0, "cpu_seconds": 2.0}, {"seconds": 6.0}],
                "klio": [klio(5.0, 1.0), klio(9.0, 0.5)],
            }
        },
        "incremental": {
            "inserted_rows": 10,
            "updated_rows": 5,
            "changed_pages": 1000,
            "changed_files": 3,
            "changed_bytes": 8_192_000,
            "added_bytes": 4_096_000,
            "chunks_new": 40,
        },
        "restore": {
            "samples": {
                "pg_basebackup": [{"seconds": 4.0, "cpu_seconds": 2.0}],
                "klio": [{"seconds": 3.0, "cpu_seconds": 3.0}],
            }
        },
    }


def _replay() -> dict[str, Any]:
    return {
        "segments": 64,
        "bytes": 64 << 24,
        "samples": {
            "cp": [{"seconds": 10.0, "redo_seconds": 8.0}, {"seconds": 9.0, "redo_seconds": 4.0}],
            "klio": [
                {"seconds": 12.0, "redo_seconds": 16.0},
                {"seconds": 9.0, "redo_seconds": 8.0},
            ],
        },
    }


def test_backup_times_ratios_and_the_second_backup() -> None:
    summary = report.summarize({"backup": _backup()})["backup"]
    backup = summary["backup"]
    # medians of (4, 6) and (5, 9): 5 and 7; without the WAL wait (4, 8.5): 6.25
    assert backup["pg_basebackup"]["median_seconds"] == 5.0
    assert "cpu_pct" not in backup["pg_basebackup"]  # one sample lacks the CPU
    assert backup["klio"]["median_wal_wait_seconds"] == 0.75
    assert backup["ratio"] == {"klio": 7.0 / 5.0, "klio_without_wal_wait": 6.25 / 5.0}
    assert summary["incremental"]["ratio"] == 0.5
    assert summary["restore"]["ratio"] == {"klio": 0.75}
    assert summary["restore"]["klio"]["cpu_pct"] == 100.0
    assert report.missing_figures({"backup": summary}) == []


def test_replay_rate_is_segments_per_second_of_redo() -> None:
    summary = report.summarize({"replay": _replay()})["replay"]
    # cp: 64 segments in 8 and 4 s -> 8 and 16 seg/s; klio: 4 and 8 seg/s
    assert summary["cp"]["median_segments_s"] == 12.0
    assert summary["klio"]["median_segments_s"] == 6.0
    assert summary["ratio"] == {"klio": 0.5}
    missing = report.missing_figures({"replay": {k: v for k, v in summary.items() if k != "cp"}})
    assert missing == ["replay.cp.median_segments_s"]


def test_render_backup_and_replay_tables() -> None:
    raw = {"backup": _backup(), "replay": _replay()}
    doc = {
        "date": "2026-01-02 03:04 UTC",
        "machine": {"nproc": 2, "cpu": "C", "memory_gb": 1.0, "kernel": "L", "postgresql": "15"}
        | {"python": "3.11"},
        "options": {},
        "raw": raw,
        "summary": report.summarize(raw),
    }
    text = report.render(doc)
    assert "### Base backup of a 1200 MB cluster (2 runs each)" in text
    assert "| Klio, without the wait for the WAL range | 6.25 | — | — | — | 1.25× |" in text
    assert "| 1000 pages in 3 files | 8.2 | 4.1 (40 new chunks + manifest) | **0.50×** |" in text
    assert (
        "| `klio restore` (materialise PGDATA, no recovery) | 3.00 | — | 100% | — | 0.75× |" in text
    )
    assert "| `klio wal-restore` (prefetch spool) | 6.0 | 12.00 | 10.50 | 0.50× |" in text
