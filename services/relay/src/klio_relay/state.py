"""The relay's metrics, and the lag of each cluster: what Tier 1 holds that Tier 2 does not yet."""

from __future__ import annotations

import time
from dataclasses import dataclass

from klio_common.runtime.metrics import counter, gauge

# botocore operation names → the ``op`` label (short, stable).
_OPS = {
    "put_object": "put",
    "head_object": "head",
    "get_object": "get",
    "list_objects_v2": "list",
    "delete_object": "delete",
    "create_multipart_upload": "multipart_create",
    "upload_part": "multipart_part",
    "complete_multipart_upload": "multipart_complete",
    "abort_multipart_upload": "multipart_abort",
}


class RelayMetrics:
    """The relay's Prometheus collectors, on the process registry."""

    def __init__(self) -> None:
        c = ["cluster"]
        self.lag_segments = gauge(
            "klio_relay_lag_segments", "WAL files on Tier 1 not yet in the bucket", c
        )
        self.lag_bytes = gauge(
            "klio_relay_lag_bytes", "Stored bytes on Tier 1 not yet in the bucket (estimate)", c
        )
        self.lag_seconds = gauge(
            "klio_relay_lag_seconds", "Age of the oldest item not yet in the bucket", c
        )
        self.bytes_sent = counter("klio_relay_bytes_sent", "Body bytes sent to the bucket")
        self.requests = counter("klio_relay_requests", "Requests made to the bucket", ["op"])
        self.skipped = counter(
            "klio_relay_objects_skipped", "Objects not sent because the bucket already had them"
        )
        self.uploaded = counter("klio_relay_objects_uploaded", "Objects stored in the bucket")
        self.conflicts = counter(
            "klio_relay_conflicts", "Keys holding other content in the bucket (never overwritten)"
        )
        self.corrupt = counter(
            "klio_relay_corrupt_objects", "Tier-1 objects that failed their checks (not sent)"
        )

    def observe(self, op: str, sent: int) -> None:
        """The `klio_common.storage.s3.RequestObserver` of the relay's store."""
        self.requests.labels(_OPS.get(op, op)).inc()
        if sent:
            self.bytes_sent.inc(sent)


@dataclass(frozen=True)
class _Item:
    size: int
    since: float
    wal: bool


class Lag:
    """What one cluster still has to relay, exported as the three lag gauges.

    Items are keyed by their relative path (WAL files) or ``backup:<id>`` (backups); ``since`` is
    when the item appeared on Tier 1. Scrapes may come from another thread, so readers copy the
    items first (one atomic step) rather than iterate over the live dict.
    """

    def __init__(self, cluster: str, metrics: RelayMetrics) -> None:
        self._items: dict[str, _Item] = {}
        metrics.lag_segments.labels(cluster).set_function(self.segments)
        metrics.lag_bytes.labels(cluster).set_function(self.bytes)
        metrics.lag_seconds.labels(cluster).set_function(self.seconds)

    def add(self, key: str, size: int, since: float, *, wal: bool) -> None:
        """Count ``key`` as waiting (again: the first ``since`` is kept)."""
        old = self._items.get(key)
        self._items[key] = _Item(size, min(since, old.since) if old else since, wal)

    def done(self, key: str) -> None:
        """``key`` is in the bucket."""
        self._items.pop(key, None)

    def replace_wal(self, items: dict[str, tuple[int, float]]) -> None:
        """Replace the WAL items by a fresh scan of Tier 1 (path → (size, mtime))."""
        kept = {k: v for k, v in self._items.items() if not v.wal}
        kept.update({k: _Item(size, since, True) for k, (size, since) in items.items()})
        self._items = kept

    def segments(self) -> float:
        """WAL files waiting."""
        return float(sum(1 for item in list(self._items.values()) if item.wal))

    def bytes(self) -> float:
        """Stored bytes waiting (for backups: the bytes of the chunks they added)."""
        return float(sum(item.size for item in list(self._items.values())))

    def seconds(self) -> float:
        """Seconds since the oldest waiting item appeared on Tier 1; 0 when nothing waits."""
        items = list(self._items.values())
        if not items:
            return 0.0
        return max(0.0, time.time() - min(item.since for item in items))

    def pending(self) -> list[str]:
        """Keys of the waiting items."""
        return sorted(self._items)
