"""Running the installed ``klio`` command and filling a Tier-1 WAL archive for its tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.pg.walname import WalSegment
from tests.fixtures.paths import KlioConfigWriter

KLIO = Path(sys.executable).with_name("klio")
SEG = 16 << 20
SMALL = 1 << 20  # verify tests use 1 MiB segments: same logic, less to encode


def klio(
    *args: str, config: Path | None = None, user: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``klio`` with a clean environment (no KLIO_CONFIG leaking in)."""
    argv = [str(KLIO), *(["--config", str(config)] if config else []), *args]
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)


def open_archive(tier1: Path, keys: Mapping[str, Path], seg_size: int = SEG) -> WalArchive:
    archive = WalArchive(tier1, "main")
    archive.ensure_identity(7000000000000000001, seg_size, 150000, int(time.time()))
    return archive


def keyring(keys: Mapping[str, Path], active: str = "k1") -> KeyRing:
    return KeyRing.load(active, dict(keys))


def store(archive: WalArchive, kr: KeyRing, tli: int, segnos: range, size: int) -> None:
    codec_ = compression.get("zstd", 3)
    for segno in segnos:
        body = segno.to_bytes(8, "big") * (size // 8)
        archive.store_segment(WalSegment(tli, segno, size).name, body, codec=codec_, keyring=kr)


def read_config(
    klio_config: KlioConfigWriter,
    tier1: Path,
    keys: Mapping[str, Path],
    path: Path | None = None,
) -> Path:
    """A configuration for the read path only: Tier 1, keys and the cluster ``main``."""
    cluster = {"name": "main", "conninfo": "host=127.0.0.1 port=1 user=klio"}
    return klio_config(tier1=tier1, keys=keys, extra={"clusters": [cluster]}, path=path)


def postgres_dir(workdir: Path) -> Path:
    """A directory the postgres user may write into (like pg_wal)."""
    path = workdir / "pg_wal"
    path.mkdir()
    subprocess.run(["chown", "postgres:postgres", str(path)], check=True)
    return path
