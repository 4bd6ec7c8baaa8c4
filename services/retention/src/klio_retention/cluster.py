"""One cluster as retention sees it: its setup, the outcome of a run, and the run lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klio_common import fsio
from klio_common.catalog.backups import BackupCatalog
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.errors import Retryable
from klio_common.runtime.outbox import Outbox
from klio_common.storage.layout import BucketLayout
from klio_common.storage.s3 import S3Store
from klio_retention.bucket import Bucket
from klio_retention.planner import DeletionPlan
from klio_retention.policy import Policy
from klio_retention.state import RetentionMetrics

LOCK_FILE = "retention.lock"
FAULT_POINT = "KLIO_RETENTION_FAULT_POINT"


@dataclass
class ClusterSetup:
    """Everything retention needs for one cluster."""

    name: str
    root: Path
    keyring: KeyRing
    codec: Codec
    policies: dict[int, Policy]
    minimum_redundancy: int
    chunk_grace: float
    outbox: Outbox
    metrics: RetentionMetrics
    store: S3Store | None = None
    prefix: str = ""
    file_mode: int = 0o640
    dir_mode: int = 0o750

    @property
    def cluster_dir(self) -> Path:
        return self.root / self.name

    def catalog(self) -> BackupCatalog:
        return BackupCatalog(
            self.cluster_dir,
            self.keyring,
            self.codec,
            file_mode=self.file_mode,
            dir_mode=self.dir_mode,
        )

    def bucket(self) -> Bucket:
        assert self.store is not None
        return Bucket(self.store, BucketLayout.of(self.prefix, self.name), self.keyring)


@dataclass
class Outcome:
    """What one run deleted from one tier."""

    tier: int
    plan: DeletionPlan
    expired: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    wal: int = 0
    chunks: int = 0
    bytes: int = 0
    refused: dict[str, str] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The JSON of ``klio retention apply --json``."""
        return {
            "cluster": self.plan.cluster,
            "tier": self.tier,
            "policy": self.plan.policy,
            "expired": self.expired,
            "leftovers_removed": self.leftovers,
            "wal_deleted": self.wal,
            "chunks_deleted": self.chunks,
            "bytes_freed": self.bytes,
            "planned_bytes": self.plan.bytes,
            "refused": [{"path": p, "reason": r} for p, r in sorted(self.refused.items())],
            "held": [{"path": h.path, "reason": h.reason} for h in self.plan.held],
            "chunks_held": self.plan.chunks_held,
        }


@contextlib.contextmanager
def run_lock(cluster_dir: Path, *, wait: float) -> Iterator[None]:
    """One retention run per cluster at a time (the service and ``klio retention apply``).

    Raises:
        Retryable: another run holds the lock for longer than ``wait`` seconds.
    """
    fsio.ensure_dir(cluster_dir)
    fd = os.open(cluster_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Retryable(
                        f"another retention run of {cluster_dir.name} is in progress",
                        hint="wait for it to finish (klio-retention or klio retention apply)",
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def fault_point(name: str) -> None:
    """Stop this process here when ``KLIO_RETENTION_FAULT_POINT`` names this point (crash tests)."""
    if os.environ.get(FAULT_POINT) == name:
        os.kill(os.getpid(), signal.SIGSTOP)
