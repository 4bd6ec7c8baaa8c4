"""What the basebackup service is doing: metrics, and each running backup's ``progress.json``."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import msgspec

from klio_common import fsio
from klio_common.errors import Retryable
from klio_common.runtime.metrics import gauge

log = logging.getLogger("klio.basebackup")


class BackupMetrics:
    """The basebackup's Prometheus metrics (labelled by cluster), on the process registry."""

    def __init__(self) -> None:
        c = ["cluster"]
        self.bytes_done = gauge(
            "klio_backup_bytes_done", "Bytes of the running backup received so far", c
        )
        self.bytes_estimated = gauge(
            "klio_backup_bytes_estimated", "Size of the running backup as the server estimated", c
        )
        self.running = gauge("klio_backup_running", "1 while a base backup runs", c)
        self.last_success = gauge(
            "klio_backup_last_success_timestamp",
            "Unix time at which the last successful backup was committed",
            c,
        )
        self.duration = gauge(
            "klio_backup_duration_seconds", "Wall time of the last successful backup", c
        )
        self.chunks_new = gauge(
            "klio_backup_chunks_new", "Chunks the last successful backup added to the store", c
        )


class Progress:
    """The progress of one backup: kept in memory, mirrored to ``progress.json`` and metrics.

    Args:
        path: ``backups/<id>/progress.json``.
        backup_id: the backup.
        cluster: the cluster (metric label).
        metrics: the service's metrics.
        file_mode: mode of the file.
        dir_mode: mode of created directories.
    """

    def __init__(
        self,
        path: Path,
        backup_id: str,
        cluster: str,
        metrics: BackupMetrics,
        *,
        file_mode: int = 0o640,
        dir_mode: int = 0o750,
    ) -> None:
        self.path = path
        self.backup_id = backup_id
        self.phase = "starting"
        self.bytes_done = 0
        self.bytes_estimated = 0
        self.wal_missing: int | None = None
        self.started_at = time.time()
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._done = metrics.bytes_done.labels(cluster)
        self._estimated = metrics.bytes_estimated.labels(cluster)
        self._running = metrics.running.labels(cluster)
        self._done.set(0)
        self._estimated.set(0)
        self._running.set(1)

    def received(self, nbytes: int) -> None:
        """Bytes of the stream received so far (hot path: no I/O)."""
        if nbytes > self.bytes_done:
            self.bytes_done = nbytes

    def estimated(self, nbytes: int) -> None:
        """The server's estimate of the backup's size."""
        self.bytes_estimated = nbytes

    def document(self) -> dict[str, Any]:
        """What ``progress.json`` holds (read by ``klio backup show``)."""
        return {
            "backup_id": self.backup_id,
            "phase": self.phase,
            "bytes_done": self.bytes_done,
            "bytes_estimated": max(self.bytes_estimated, self.bytes_done),
            "wal_segments_missing": self.wal_missing,
            "started_at": self.started_at,
            "updated_at": time.time(),
        }

    def write(self) -> None:
        """Refresh the metrics and replace ``progress.json`` (skipped once the backup is gone)."""
        self._done.set(self.bytes_done)
        self._estimated.set(max(self.bytes_estimated, self.bytes_done))
        if not self.path.parent.is_dir():
            return  # aborted or committed: do not recreate its directory
        try:
            fsio.atomic_write(
                self.path,
                msgspec.json.encode(self.document()),
                file_mode=self._file_mode,
                dir_mode=self._dir_mode,
            )
        except (OSError, Retryable) as exc:  # a full volume fails the backup elsewhere
            log.warning("cannot write %s: %s", self.path, exc)

    def finished(self) -> None:
        """The backup ended (either way)."""
        self._running.set(0)
        self.path.unlink(missing_ok=True)
