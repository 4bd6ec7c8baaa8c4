"""Report of the base backup and WAL replay benchmarks: summaries, required figures, tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench.stats import MB, column, median, ratio, runs_text, table, times
from klio_common.runtime.settings import CompressionSettings

BACKUP_BASELINE = "pg_basebackup"
REPLAY_BASELINE = "cp"
REPLAY_VARIANTS = ("klio",)
_LEVEL = CompressionSettings().backup  # what the basebackup service runs with: the default
LABELS = {
    "pgbb_tar": "`pg_basebackup -Ft -X none -c fast`",
    "klio_bb": f"Klio, zstd-{_LEVEL} + AES-256-GCM + dedup (request to commit)",
    "klio_bb_nowait": "Klio, without the wait for the WAL range",
    "pgbb_plain": "`pg_basebackup -Fp -X none -c fast`",
    "klio_rs": "`klio restore` (materialise PGDATA, no recovery)",
    "replay_cp": "`cp` from a directory of plain segments",
    "replay_klio": "`klio wal-restore` (prefetch spool)",
}


def _timed(samples: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, Any]:
    """Median seconds (and CPU) per variant, and each variant's time over pg_basebackup's."""
    out: dict[str, Any] = {}
    for name, runs in samples.items():
        seconds = column(runs, "seconds")
        row = {"median_seconds": median(seconds)}
        if all("cpu_seconds" in r for r in runs):
            cpu = column(runs, "cpu_seconds")
            row["cpu_pct"] = 100 * median([c / s for c, s in zip(cpu, seconds, strict=True)])
        for key in ("stream_seconds", "wal_wait_seconds", "stored_bytes", "bytes"):
            if all(key in r for r in runs):
                row[f"median_{key}"] = median(column(runs, key))
        if all("wal_wait_seconds" in r for r in runs):
            # The WAL wait is the receiver's pace, not the backup's work: shown apart.
            row["median_seconds_without_wal_wait"] = median(
                [r["seconds"] - r["wal_wait_seconds"] for r in runs]
            )
        out[name] = row
    base = out[BACKUP_BASELINE]["median_seconds"]
    out["ratio"] = {v: ratio(out[v]["median_seconds"], base) for v in out if v != BACKUP_BASELINE}
    if "klio" in out and "median_seconds_without_wal_wait" in out["klio"]:
        without = out["klio"]["median_seconds_without_wal_wait"]
        out["ratio"]["klio_without_wal_wait"] = ratio(without, base)
    return out


def summarize_backup(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Backup and restore times against pg_basebackup, and the second backup's size ratio.

    Args:
        raw: ``{"cluster", "backup": {"samples"}, "incremental": {...}, "restore": {"samples"}}``
            (see `bench.backup.run`).

    Returns:
        ``{"cluster_mb", "backup": {variant: ..., "ratio": {...}}, "incremental": {"changed_mb",
        "added_mb", "ratio"}, "restore": {variant: ..., "ratio": {...}}}``; ratios are Klio's
        time over pg_basebackup's (lower is better) and Tier-1 bytes added over changed bytes.
    """
    inc = raw["incremental"]
    return {
        "cluster_mb": raw["cluster"]["bytes"] / MB,
        "backup": _timed(raw["backup"]["samples"]),
        "incremental": {
            "changed_mb": inc["changed_bytes"] / MB,
            "added_mb": inc["added_bytes"] / MB,
            "ratio": ratio(inc["added_bytes"], inc["changed_bytes"]),
        },
        "restore": _timed(raw["restore"]["samples"]),
    }


def summarize_replay(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Median replay rate (segments per second of redo) per restore_command, and Klio's ratio.

    Args:
        raw: ``{"segments", "samples": {method: [{"seconds", "redo_seconds"}, ...]}}``.

    Returns:
        ``{method: {"median_segments_s", "median_redo_seconds", "median_seconds"}, ...,
        "ratio": {"klio": its segments/s over cp's}}`` (higher is better).
    """
    out: dict[str, Any] = {}
    segments = float(raw["segments"])
    for name, runs in raw["samples"].items():
        redo = column(runs, "redo_seconds")
        out[name] = {
            "median_segments_s": median([segments / s for s in redo]),
            "median_redo_seconds": median(redo),
            "median_seconds": median(column(runs, "seconds")),
        }
    base = out[REPLAY_BASELINE]["median_segments_s"]
    out["ratio"] = {
        v: ratio(out[v]["median_segments_s"], base) for v in REPLAY_VARIANTS if v in out
    }
    return out


def required_figures(benchmarks: Sequence[str]) -> list[str]:
    """The figure names a complete report of ``benchmarks`` holds for these two benchmarks."""
    needed: list[str] = []
    if "backup" in benchmarks:
        for part in ("backup", "restore"):
            for name in (BACKUP_BASELINE, "klio"):
                needed += [f"backup.{part}.{name}.median_seconds"]
            needed += [f"backup.{part}.ratio.klio"]
        needed += ["backup.backup.ratio.klio_without_wal_wait", "backup.incremental.ratio"]
        needed += ["backup.backup.klio.median_wal_wait_seconds"]
    if "replay" in benchmarks:
        for name in (REPLAY_BASELINE, *REPLAY_VARIANTS):
            needed += [f"replay.{name}.median_segments_s"]
        needed += [f"replay.ratio.{v}" for v in REPLAY_VARIANTS]
    return needed


def _time_rows(summary: Mapping[str, Any], labels: Mapping[str, str]) -> list[list[str]]:
    rows = []
    for name, label in labels.items():
        row = summary[name]
        cpu = row.get("cpu_pct")
        wait = row.get("median_wal_wait_seconds")
        stored = row.get("median_stored_bytes")
        rows.append(
            [
                label,
                f"{row['median_seconds']:.2f}",
                f"{wait:.2f}" if wait is not None else "—",
                f"{cpu:.0f}%" if cpu is not None else "—",
                f"{stored / MB:.0f}" if stored is not None else "—",
                times(summary["ratio"][name]) if name in summary["ratio"] else "1.00× (baseline)",
            ]
        )
    return rows


def render_backup(summary: Mapping[str, Any], raw: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the backup, second backup and restore tables."""
    head = ["", "median s", "of which WAL wait s", "CPU (% of a core)", "stored MB", "ratio"]
    runs = runs_text(raw["backup"])
    backup = summary["backup"]
    rows = _time_rows(backup, {BACKUP_BASELINE: LABELS["pgbb_tar"], "klio": LABELS["klio_bb"]})
    if "klio_without_wal_wait" in backup["ratio"]:
        without = backup["klio"]["median_seconds_without_wal_wait"]
        wait = times(backup["ratio"]["klio_without_wal_wait"])
        rows.append([LABELS["klio_bb_nowait"], f"{without:.2f}", "—", "—", "—", wait])
    inc, raw_inc = summary["incremental"], raw["incremental"]
    restore = _time_rows(
        summary["restore"], {BACKUP_BASELINE: LABELS["pgbb_plain"], "klio": LABELS["klio_rs"]}
    )
    return [
        f"### Base backup of a {summary['cluster_mb']:.0f} MB cluster ({runs} each)",
        "",
        *table(["backup", *head[1:]], rows),
        "",
        f"### Second backup after a change of {raw_inc['inserted_rows']} new rows and "
        f"{raw_inc['updated_rows']} updated rows",
        "",
        *table(
            ["pages changed since the first backup's start", "MB", "added to Tier 1 MB", "ratio"],
            [
                [
                    f"{raw_inc['changed_pages']} pages in {raw_inc['changed_files']} files",
                    f"{inc['changed_mb']:.1f}",
                    f"{inc['added_mb']:.1f} ({raw_inc['chunks_new']} new chunks + manifest)",
                    f"**{times(inc['ratio'])}**",
                ]
            ],
        ),
        "",
        f"### Restore of that backup, without recovery ({runs_text(raw['restore'])} each)",
        "",
        *table(["restore", *head[1:]], restore),
        "",
    ]


def render_replay(summary: Mapping[str, Any], raw: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the WAL replay table."""
    rows = []
    for name in (REPLAY_BASELINE, *REPLAY_VARIANTS):
        if name not in summary:
            continue
        row = summary[name]
        vs = times(summary["ratio"][name]) if name in summary["ratio"] else "1.00× (baseline)"
        rows.append(
            [
                LABELS[f"replay_{name}"],
                f"{row['median_segments_s']:.1f}",
                f"{row['median_redo_seconds']:.2f}",
                f"{row['median_seconds']:.2f}",
                vs,
            ]
        )
    head = ["restore_command", "segments/s", "redo s", "start to promoted s", "ratio"]
    title = (
        f"Recovery of {raw['segments']} segments ({raw['bytes'] / MB:.0f} MB of WAL; "
        f"{runs_text(raw)} each)"
    )
    return [f"### {title}", "", *table(head, rows), ""]
