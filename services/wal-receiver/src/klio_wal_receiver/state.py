"""What one cluster's receiver is doing: metrics, readiness, and the status document for the CLI."""

from __future__ import annotations

import time
from typing import Any

from klio_common.catalog.wal import WalArchive
from klio_common.pg.lsn import Lsn
from klio_common.runtime.metrics import counter, gauge


class ReceiverMetrics:
    """The wal-receiver's Prometheus metrics (labelled by cluster), on the process registry."""

    def __init__(self) -> None:
        c = ["cluster"]
        self.bytes_received = counter(
            "klio_wal_bytes_received", "WAL bytes received from the primary", c
        )
        self.flushed_lsn = gauge(
            "klio_wal_flushed_lsn", "Last LSN durable in the archive (as a number)", c
        )
        self.lag_bytes = gauge(
            "klio_wal_lag_bytes", "Bytes between the primary's WAL end and the archive", c
        )
        self.lag_seconds = gauge(
            "klio_wal_lag_seconds", "Seconds since the archive was last caught up", c
        )
        self.segments_closed = counter(
            "klio_wal_segments_closed", "Segments closed into the archive", c
        )
        self.reconnects = counter("klio_wal_reconnects", "Reconnections to the primary", c)
        self.gaps = counter("klio_wal_gaps", "WAL gaps detected (WAL the server no longer had)", c)
        self.streaming = gauge("klio_wal_streaming", "1 while the replication stream is active", c)
        self.native_flushes = counter(
            "klio_wal_native_flushes", "Flushes of a synchronous standby made by its native turn", c
        )


class ReceiverState:
    """The live state of one cluster's stream; cheap to update on the hot path."""

    def __init__(
        self, cluster: str, slot: str, synchronous: bool, metrics: ReceiverMetrics
    ) -> None:
        self.cluster = cluster
        self.slot = slot
        self.synchronous = synchronous
        self.state = "starting"
        self.last_error: str | None = None
        self.server_timeline = 0
        self.timeline = 0
        self.server_lsn = 0
        self.received_lsn = 0
        self.flushed_lsn = 0
        self.last_closed_segment: str | None = None
        self.segments_closed_count = 0
        self.caught_up_at = time.time()
        self.turn: str | None = None  # a synchronous standby's loop: "native" or "python"
        self.native_flushes = metrics.native_flushes.labels(cluster)
        self._bytes = metrics.bytes_received.labels(cluster)
        self._flushed = metrics.flushed_lsn.labels(cluster)
        self._lag_bytes = metrics.lag_bytes.labels(cluster)
        self._lag_seconds = metrics.lag_seconds.labels(cluster)
        self._closed = metrics.segments_closed.labels(cluster)
        self._streaming = metrics.streaming.labels(cluster)
        self.reconnects = metrics.reconnects.labels(cluster)
        self.gaps = metrics.gaps.labels(cluster)

    def connecting(self) -> None:
        self.state = "connecting"
        self._streaming.set(0)

    def streaming(self, timeline: int) -> None:
        self.state = "streaming"
        self.timeline = timeline
        self.last_error = None
        self._streaming.set(1)

    def failed(self, error: str) -> None:
        self.state = "error"
        self.last_error = error
        self._streaming.set(0)

    def stopped(self) -> None:
        self.state = "stopped"
        self._streaming.set(0)

    def received(self, nbytes: int, wal_end: int) -> None:
        self._bytes.inc(nbytes)
        if wal_end > self.server_lsn:
            self.server_lsn = wal_end

    def flushed(self, durable: int, received: int) -> None:
        self.flushed_lsn = durable
        self.received_lsn = received
        self._flushed.set(durable)
        if durable >= self.server_lsn:
            self.caught_up_at = time.time()

    def segment_closed(self, name: str) -> None:
        self.last_closed_segment = name
        self.segments_closed_count += 1
        self._closed.inc()

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: streaming, or why not."""
        if self.state == "streaming":
            return True, "streaming"
        return False, f"{self.state}: {self.last_error}" if self.last_error else self.state

    def document(self) -> dict[str, Any]:
        """The status document ``klio wal status`` reads; also refreshes the lag gauges."""
        lag_bytes = max(0, self.server_lsn - self.flushed_lsn)
        lag_seconds = 0.0 if lag_bytes == 0 else max(0.0, time.time() - self.caught_up_at)
        self._lag_bytes.set(lag_bytes)
        self._lag_seconds.set(lag_seconds)
        return {
            "cluster": self.cluster,
            "state": self.state,
            "slot": self.slot,
            "synchronous": self.synchronous,
            "turn": self.turn,
            "timeline": self.timeline,
            "server_timeline": self.server_timeline,
            "received_lsn": str(Lsn(self.received_lsn)),
            "flushed_lsn": str(Lsn(self.flushed_lsn)),
            "server_lsn": str(Lsn(self.server_lsn)),
            "lag_bytes": lag_bytes,
            "lag_seconds": round(lag_seconds, 3),
            "last_closed_segment": self.last_closed_segment,
            "segments_closed": self.segments_closed_count,
            "last_error": self.last_error,
            "updated_at": int(time.time()),
        }

    def publish(self, archive: WalArchive) -> None:
        """Write the status document to the archive (atomically)."""
        archive.write_status(self.document())
