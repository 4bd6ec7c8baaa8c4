"""Benchmark 3: the cost of one ``klio wal-restore`` call against ``cp`` of a plain segment."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.lab import CLUSTER, SEGMENT, VENV_BIN, Lab, children_cpu, say
from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.objects import decode_object
from klio_common.pg.walname import WalSegment
from klio_common.runtime.settings import CompressionSettings
from klio_restore import walfetch

METHODS = (
    "klio_process",
    "cp",
    "python_startup",
    "klio_imports",
    "fetch_in_process",
    "decode_in_process",
)
PROCESSES = ("klio_process", "cp", "python_startup", "klio_imports")
# What `klio wal-restore` imports before it does any work (its fast path in klio_cli.main).
IMPORTS = "import klio_cli.main, klio_cli.wal, klio_restore.context, klio_restore.walfetch"
SLOT = "bench_restore"


def run(lab: Lab, *, segments: int) -> dict[str, Any]:
    """Archive ``segments`` real WAL segments (as the receiver stores them) and restore each one.

    Returns:
        ``{"segments", "stored_bytes", "ms": {method: [ms per call]}, "cpu_ms": {...}}``.
    """
    base = lab.root / "restore"
    names, plain_dir = _segments(lab, base, segments)
    config = lab.klio_config(base, slot=SLOT, encrypted=True, compression="zstd")
    keyring = KeyRing.load("k1", {"k1": lab.key_file})
    archive = WalArchive(base / "tier1", CLUSTER)
    archive.ensure_identity(
        lab.pg.system_identifier(),
        SEGMENT,
        int(lab.pg.sql("SHOW server_version_num")[0][0]),
        int(time.time()),
    )
    codec = compression.get("zstd", CompressionSettings().wal)  # as the receiver stores it
    stored = 0
    for name in names:
        stored += archive.store_segment(
            name, (plain_dir / name).read_bytes(), codec=codec, keyring=keyring
        ).stored_size
    say(f"restore: {segments} segments archived, {stored / segments / 1e6:.1f} MB each")
    dest_dir = base / "pg_wal"
    dest_dir.mkdir()
    dest = dest_dir / "RECOVERYXLOG"  # what PostgreSQL passes as %p
    klio = [str(VENV_BIN / "klio"), "--config", str(config), "wal-restore"]
    ms: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, float] = {m: 0.0 for m in PROCESSES}
    sources = walfetch.sources(archive, keyring)
    for index, name in enumerate(names):
        source = plain_dir / name
        stored_bytes = archive.segment_path(name).read_bytes()
        calls: dict[str, Callable[[], None]] = {
            "klio_process": _process([*klio, name, str(dest)]),
            "cp": _process(["cp", str(source), str(dest)]),
            "python_startup": _process([sys.executable, "-c", "pass"]),
            "klio_imports": _process([sys.executable, "-c", IMPORTS]),
            "fetch_in_process": partial(_fetched, name, dest, sources),
            "decode_in_process": partial(_decoded, stored_bytes, keyring, name),
        }
        # Rotate the order so no method always runs first (or right after a cleanup).
        order = METHODS[index % len(METHODS) :] + METHODS[: index % len(METHODS)]
        for method in order:
            before = children_cpu()
            began = time.perf_counter()
            calls[method]()
            ms[method].append((time.perf_counter() - began) * 1000)
            if method in cpu:
                cpu[method] += (children_cpu() - before) * 1000
            _check_dest(dest, method, source if index == 0 else None)
    return {"segments": segments, "stored_bytes": stored, "ms": ms, "cpu_ms": cpu}


def _segments(lab: Lab, base: Path, count: int) -> tuple[list[str], Path]:
    """Write ``count`` segments of fresh WAL and copy them (plain) out of pg_wal."""
    lab.create_slots([SLOT])  # keeps the segments in pg_wal until they are copied
    try:
        start = lab.lsn()
        lab.generate_wal((count + 1) * SEGMENT, pgbench_share=0.0)
        end = lab.switch_wal()
        first = WalSegment.from_lsn(1, start, SEGMENT).next()
        segs = [first]
        while len(segs) < count:
            segs.append(segs[-1].next())
        if segs[-1].end_lsn > end:
            raise RuntimeError(f"not enough WAL written: {segs[-1].name} ends after {end:X}")
        plain_dir = base / "plain"
        plain_dir.mkdir(parents=True)
        for seg in segs:
            (plain_dir / seg.name).write_bytes((lab.pg.pg_wal_dir / seg.name).read_bytes())
    finally:
        lab.drop_slots([SLOT])
    return [s.name for s in segs], plain_dir


def _process(argv: list[str]) -> Callable[[], None]:
    def call() -> None:
        done = subprocess.run(argv, capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr!r}")

    return call


def _fetched(name: str, dest: Path, sources: list[walfetch.Source]) -> None:
    if not walfetch.fetch(name, dest, sources):
        raise RuntimeError(f"walfetch did not find {name}")


def _decoded(data: bytes, keyring: KeyRing, name: str) -> None:
    header, plain = decode_object(data, keyring, source=name)
    if len(plain) != SEGMENT or header.name != name:
        raise RuntimeError(f"decoding {name} gave {header.name}, {len(plain)} bytes")


def _check_dest(dest: Path, method: str, source: Path | None) -> None:
    """The restored file must be the whole segment; compared byte for byte once per method."""
    if method in ("python_startup", "klio_imports", "decode_in_process"):
        return
    size = dest.stat().st_size
    if size != SEGMENT or (source is not None and dest.read_bytes() != source.read_bytes()):
        raise RuntimeError(f"{method} restored a wrong {dest} ({size} bytes)")
    dest.unlink()
