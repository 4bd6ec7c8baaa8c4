"""The retention service's metrics: deleted, freed and held, per cluster and tier."""

from __future__ import annotations

from klio_common.runtime.metrics import counter, gauge


class RetentionMetrics:
    """The retention service's Prometheus collectors (labelled by cluster and tier)."""

    def __init__(self) -> None:
        labels = ["cluster", "tier"]
        self.backups_expired = counter(
            "klio_retention_backups_expired", "Backups deleted by the retention policy", labels
        )
        self.wal_pruned = counter(
            "klio_retention_wal_segments_pruned",
            "WAL segments no kept backup needed, deleted",
            labels,
        )
        self.chunks_deleted = counter(
            "klio_retention_chunks_deleted", "Chunks no kept backup referenced, deleted", labels
        )
        self.bytes_freed = counter(
            "klio_retention_bytes_freed", "Stored bytes freed by deletions", labels
        )
        self.refused = counter(
            "klio_retention_objects_refused",
            "Objects the bucket refused to delete (object lock, policy): reported, kept",
            labels,
        )
        self.failures = counter("klio_retention_failures", "Retention runs that failed", labels)
        self.held = gauge(
            "klio_retention_held_objects",
            "Backups, WAL files and chunks the policy would delete that are held (last run)",
            labels,
        )
        self.last_run = gauge(
            "klio_retention_last_run_timestamp", "Unix time of the last finished run", labels
        )
        self.plan_seconds = gauge(
            "klio_retention_plan_seconds", "Wall time of the last run's planning", labels
        )
