"""Benchmark figures: medians, ratios, the flat list of figures and the Markdown report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bench import report_backup
from bench.stats import MB, column, mean, median, ratio, runs_text, table, times
from klio_common.runtime.settings import CompressionSettings

__all__ = ["MB", "mean", "median", "ratio"]  # the arithmetic lives in bench.stats

INGEST_BASELINE = "pg_receivewal"
INGEST_VARIANTS = ("klio_zstd_aes", "klio_none")
SYNC_BASELINE = "pg_receivewal"
SYNC_CONTROL = "pg_receivewal_control"  # the baseline against itself: the resolution
SYNC_VARIANTS = ("klio", "klio_plain", SYNC_CONTROL)
RESTORE_BASELINE = "cp"
RESTORE_METHODS = (
    "klio_process",
    "python_startup",
    "klio_imports",
    "fetch_in_process",
    "decode_in_process",
)

_WAL_LEVEL = CompressionSettings().wal  # what the receiver runs with: the default

LABELS = {
    "pg_receivewal": "pg_receivewal",
    "klio_zstd_aes": f"Klio, zstd-{_WAL_LEVEL} + AES-256-GCM",
    "klio_none": "Klio, no compression, no encryption",
    "klio": f"Klio (`synchronous: true`, zstd-{_WAL_LEVEL} + AES-256-GCM)",
    "klio_plain": f"Klio, no encryption (`synchronous: true`, zstd-{_WAL_LEVEL})",
    SYNC_CONTROL: "pg_receivewal again (control: the baseline against itself)",
    "cp": "`cp` of a plain segment (process)",
    "klio_process": "`klio wal-restore` (process)",
    "python_startup": "`python -c pass` (interpreter start-up alone)",
    "klio_imports": "start-up + the imports of `wal-restore`, no work (process)",
    "fetch_in_process": "fetch in-process (read + decrypt + decompress + verify + write)",
    "decode_in_process": "decode in-process (decrypt + decompress + verify, bytes in memory)",
}


def summarize_ingest(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Median throughput and CPU per receiver, and each Klio variant's ratio to pg_receivewal.

    Args:
        raw: ``{"bytes": N, "samples": {receiver: [{"seconds", "cpu_seconds"}, ...]}}``.

    Returns:
        ``{receiver: {"median_mb_s", "median_seconds", "median_cpu_seconds", "cpu_pct"}, ...,
        "ratio": {variant: Klio MB/s / pg_receivewal MB/s}}``.
    """
    nbytes = float(raw["bytes"])
    out: dict[str, Any] = {}
    for name, samples in raw["samples"].items():
        seconds = column(samples, "seconds")
        cpu = column(samples, "cpu_seconds")
        out[name] = {
            "median_mb_s": median([nbytes / MB / s for s in seconds]),
            "median_seconds": median(seconds),
            "median_cpu_seconds": median(cpu),
            "cpu_pct": 100 * median([c / s for c, s in zip(cpu, seconds, strict=True)]),
        }
        if all("startup_seconds" in s for s in samples):
            startup = column(samples, "startup_seconds")
            out[name]["median_startup_seconds"] = median(startup)
            streaming = [s - u for s, u in zip(seconds, startup, strict=True)]
            out[name]["median_mb_s_after_startup"] = median([nbytes / MB / s for s in streaming])
    base = out[INGEST_BASELINE]["median_mb_s"]
    out["ratio"] = {v: ratio(out[v]["median_mb_s"], base) for v in INGEST_VARIANTS if v in out}
    return out


def summarize_sync(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Median pgbench TPS per synchronous standby, and Klio's ratio to pg_receivewal.

    Args:
        raw: ``{"samples": {standby: [{"tps", "cpu_seconds", "seconds"}, ...]}}``.

    Returns:
        ``{standby: {"median_tps", "cpu_pct"}, ..., "ratio": {variant: Klio TPS / its TPS},
        "pairs": {variant: [ratio of run i, ...]}, "median_pair": {variant: their median}}``.
        Run i of each standby is adjacent in time (`sync_standby.run` rotates the order), so
        a pair's ratio is free of the machine's drift over the run, which the ratio of the
        medians is not.
    """
    out: dict[str, Any] = {}
    for name, samples in raw["samples"].items():
        cpu = column(samples, "cpu_seconds")
        seconds = column(samples, "seconds")
        out[name] = {
            "median_tps": median(column(samples, "tps")),
            "cpu_pct": 100 * median([c / s for c, s in zip(cpu, seconds, strict=True)]),
        }
    base = out[SYNC_BASELINE]["median_tps"]
    out["ratio"] = {v: ratio(out[v]["median_tps"], base) for v in SYNC_VARIANTS if v in out}
    tps = {name: column(samples, "tps") for name, samples in raw["samples"].items()}
    out["pairs"] = {
        v: [ratio(k, b) for k, b in zip(tps[v], tps[SYNC_BASELINE], strict=False)]
        for v in SYNC_VARIANTS
        if v in tps
    }
    out["median_pair"] = {v: median(pairs) for v, pairs in out["pairs"].items() if pairs}
    return out


def summarize_restore(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Mean and median milliseconds per call of each method, and their ratios to ``cp``.

    Args:
        raw: ``{"ms": {method: [ms per call, ...]}, "cpu_ms": {method: total}, "segments": N}``.

    Returns:
        ``{method: {"mean_ms", "median_ms", "cpu_ms_per_call"?}, ...,
        "ratio_median": {method: its median / cp's}, "ratio_mean": {...}}``.
    """
    out: dict[str, Any] = {}
    cpu = raw.get("cpu_ms", {})
    for name, values in raw["ms"].items():
        row = {"mean_ms": mean(values), "median_ms": median(values)}
        if name in cpu:
            row["cpu_ms_per_call"] = float(cpu[name]) / len(values)
        out[name] = row
    base = out[RESTORE_BASELINE]
    methods = [m for m in RESTORE_METHODS if m in out]
    out["ratio_median"] = {m: ratio(out[m]["median_ms"], base["median_ms"]) for m in methods}
    out["ratio_mean"] = {m: ratio(out[m]["mean_ms"], base["mean_ms"]) for m in methods}
    return out


SUMMARIZERS = {
    "wal_ingest": summarize_ingest,
    "sync_standby": summarize_sync,
    "wal_restore_cost": summarize_restore,
    "backup": report_backup.summarize_backup,
    "replay": report_backup.summarize_replay,
}


def summarize(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Summarize every benchmark present in ``raw`` (keyed by benchmark name)."""
    return {name: SUMMARIZERS[name](data) for name, data in raw.items()}


def required_figures(benchmarks: Sequence[str]) -> list[str]:
    """The figure names a complete report of ``benchmarks`` holds (see `figures`)."""
    needed: list[str] = []
    if "wal_ingest" in benchmarks:
        for name in (INGEST_BASELINE, *INGEST_VARIANTS):
            needed += [f"wal_ingest.{name}.median_mb_s", f"wal_ingest.{name}.cpu_pct"]
        needed += [f"wal_ingest.ratio.{v}" for v in INGEST_VARIANTS]
    if "sync_standby" in benchmarks:
        for name in (SYNC_BASELINE, *SYNC_VARIANTS):
            needed += [f"sync_standby.{name}.median_tps", f"sync_standby.{name}.cpu_pct"]
        needed += [f"sync_standby.{f}.{v}" for f in ("ratio", "median_pair") for v in SYNC_VARIANTS]
    if "wal_restore_cost" in benchmarks:
        for name in (RESTORE_BASELINE, *RESTORE_METHODS):
            needed += [f"wal_restore_cost.{name}.mean_ms", f"wal_restore_cost.{name}.median_ms"]
        for kind in ("ratio_median", "ratio_mean"):
            needed += [f"wal_restore_cost.{kind}.{m}" for m in RESTORE_METHODS]
    needed += report_backup.required_figures(benchmarks)
    return needed


def figures(summary: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a summary into ``{"bench.row.figure": value}``."""
    flat: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(figures(value, name + "."))
        elif isinstance(value, list):
            flat.update({f"{name}.{i}": float(v) for i, v in enumerate(value)})
        else:
            flat[name] = float(value)
    return flat


def missing_figures(summary: Mapping[str, Any]) -> list[str]:
    """The required figures a summary lacks (empty when the report is complete)."""
    have = figures(summary)
    return [f for f in required_figures(list(summary)) if f not in have]


# -- Markdown ---------------------------------------------------------------------------------


def render_ingest(summary: Mapping[str, Any], raw: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the catch-up ingest table."""
    rows = []
    for name in (INGEST_BASELINE, *INGEST_VARIANTS):
        if name not in summary:
            continue
        row = summary[name]
        vs = times(summary["ratio"][name]) if name in summary["ratio"] else "1.00× (baseline)"
        stored = raw.get("stored_bytes", {}).get(name)
        startup = row.get("median_startup_seconds")
        after = row.get("median_mb_s_after_startup")
        rows.append(
            [
                LABELS[name],
                f"{row['median_mb_s']:.1f}",
                f"{row['median_seconds']:.2f}",
                f"{startup:.2f}" if startup is not None else "—",
                f"{after:.1f}" if after is not None else "—",
                f"{row['cpu_pct']:.0f}%",
                f"{stored / MB:.0f}" if stored else "—",
                vs,
            ]
        )
    head = [
        "receiver",
        "median MB/s",
        "median s",
        "start-up s",
        "MB/s after start-up",
        "CPU (% of a core)",
        "stored MB",
        "ratio (MB/s)",
    ]
    runs = runs_text(raw)
    title = f"Catch-up ingest of {raw['bytes'] / MB:.0f} MB of retained WAL ({runs} each)"
    return [f"### {title}", "", *table(head, rows), ""]


def render_sync(summary: Mapping[str, Any], raw: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the synchronous standby table."""
    rows = []
    for name in (SYNC_BASELINE, *SYNC_VARIANTS):
        if name not in summary:
            continue
        row = summary[name]
        vs = times(summary["ratio"][name]) if name in summary["ratio"] else "1.00× (baseline)"
        rows.append([LABELS[name], f"{row['median_tps']:.0f}", f"{row['cpu_pct']:.0f}%", vs])
    title = f"pgbench with one synchronous standby ({raw['pgbench']}, {runs_text(raw)} each)"
    head = ["synchronous standby", "median TPS", "standby CPU (% of a core)", "ratio"]
    turns = sorted(set(raw.get("klio_turns", [])))
    note = [f"Klio's streaming loop: {', '.join(turns)}."] if turns else []
    for name, pairs in summary.get("pairs", {}).items():
        listed = ", ".join(f"{p:.2f}" for p in pairs)
        note.append(
            f"{LABELS[name].split(' (')[0]}, pair by pair (adjacent runs): {listed}; "
            f"median pair {times(summary['median_pair'][name])}."
        )
    return [f"### {title}", "", *table(head, rows), "", *note, *([""] if note else [])]


def render_restore(summary: Mapping[str, Any], raw: Mapping[str, Any]) -> list[str]:
    """Markdown lines for the per-segment restore cost table."""
    rows = []
    for name in (RESTORE_BASELINE, *RESTORE_METHODS):
        if name not in summary:
            continue
        row = summary[name]
        cpu = row.get("cpu_ms_per_call")
        base = name == RESTORE_BASELINE
        rows.append(
            [
                LABELS[name],
                f"{row['mean_ms']:.1f}",
                f"{row['median_ms']:.1f}",
                f"{cpu:.1f}" if cpu is not None else "—",
                "1.00×" if base else times(summary["ratio_mean"][name]),
                "1.00×" if base else times(summary["ratio_median"][name]),
            ]
        )
    head = ["per 16 MiB segment", "mean ms", "median ms", "CPU ms", "ratio mean", "ratio median"]
    stored = raw.get("stored_bytes", 0) / max(1, raw["segments"])
    title = (
        f"Per-segment restore cost ({raw['segments']} segments; "
        f"stored {stored / MB:.1f} MB each, zstd-{_WAL_LEVEL} + AES-256-GCM)"
    )
    return [f"### {title}", "", *table(head, rows), ""]


RENDERERS = {
    "wal_ingest": render_ingest,
    "sync_standby": render_sync,
    "wal_restore_cost": render_restore,
    "backup": report_backup.render_backup,
    "replay": report_backup.render_replay,
}


def render(doc: Mapping[str, Any]) -> str:
    """The Markdown report of one benchmark run (``doc`` as written to bench/results)."""
    machine = doc["machine"]
    lines = [
        f"## Benchmark run of {doc['date']}",
        "",
        f"Machine: {machine['nproc']} CPU ({machine['cpu']}), "
        f"{machine['memory_gb']:.0f} GB RAM, {machine['kernel']}; "
        f"PostgreSQL {machine['postgresql']}, Python {machine['python']}; "
        f"load average {machine.get('loadavg_start', 0):.1f} at the start, "
        f"{machine.get('loadavg_end', 0):.1f} at the end. "
        f"Options: {doc['options']}.",
        "",
    ]
    for name, summary in doc["summary"].items():
        lines += RENDERERS[name](summary, doc["raw"][name])
    return "\n".join(lines)
