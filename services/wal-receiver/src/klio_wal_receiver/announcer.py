"""Announcing what the archive now holds: events made durable in the outbox, then published.

The archive is the truth and events are news: an event is written to the outbox only after the
object it describes is durable, and the outbox survives NATS outages and restarts. Event ids are
deterministic (cluster, subject, name, checksum), so a re-announcement after a crash is deduplicated
by JetStream (``Nats-Msg-Id``) and is harmless to idempotent consumers anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from klio_common.catalog.wal import StoredObject, WalArchive
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.events import WalGapDetected, WalHistoryArchived, WalSegmentClosed
from klio_common.events.base import SYSTEM_ID_UNKNOWN, now
from klio_common.events.codec import event_id_for
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment, history_name
from klio_common.runtime.outbox import Outbox
from klio_wal_receiver.state import ReceiverState

log = logging.getLogger("klio.wal_receiver")


@dataclass(frozen=True)
class ClosedSegment:
    """A segment (or an old timeline's closed ``.partial``) now durable in the archive."""

    name: str
    segment: WalSegment
    start_lsn: int
    end_lsn: int
    stored: StoredObject
    partial: bool


class Announcer:
    """Stores history files and turns archive facts into outbox events for one cluster."""

    def __init__(
        self,
        archive: WalArchive,
        outbox: Outbox,
        keyring: KeyRing,
        codec: Codec,
        state: ReceiverState,
        wake: Callable[[], None],
    ) -> None:
        self.archive = archive
        self.cluster = archive.cluster
        self.outbox = outbox
        self.keyring = keyring
        self.codec = codec
        self.state = state
        self.wake = wake
        ident = archive.read_identity()
        self.system_id = ident.system_id if ident else SYSTEM_ID_UNKNOWN

    def closed(self, c: ClosedSegment) -> None:
        """A segment is durable: announce it (called on the writer's worker thread, in order)."""
        self._segment_event(c.name, c.segment.timeline, c.start_lsn, c.end_lsn, c.stored, c.partial)
        self.state.segment_closed(c.name)
        log.info(
            "cluster %s: archived %s",
            self.cluster,
            c.name,
            extra={"cluster": self.cluster, "segment": c.name},
        )

    def _segment_event(
        self, name: str, timeline: int, start: int, end: int, stored: StoredObject, partial: bool
    ) -> None:
        h = stored.header
        self.outbox.put(
            WalSegmentClosed(
                event_id=event_id_for(
                    self.cluster, "wal.segment.closed", name, h.plaintext_sha256 or ""
                ),
                occurred_at=now(),
                cluster=self.cluster,
                system_id=self.system_id,
                segment=name,
                timeline=timeline,
                start_lsn=str(Lsn(start)),
                end_lsn=str(Lsn(end)),
                size=h.plaintext_size or 0,
                stored_size=stored.stored_size,
                sha256=h.plaintext_sha256 or "",
                key_id=h.key_id,
                compression=h.codec,
                path=self.archive.relative(stored.path),
                partial=partial,
            )
        )
        self.wake()

    def history(self, timeline: int, content: bytes) -> None:
        """Archive a timeline history file (idempotently) and announce it."""
        stored = self.archive.store_history(
            timeline, content, codec=self.codec, keyring=self.keyring
        )
        if stored.created:
            log.info("cluster %s: archived %s", self.cluster, history_name(timeline))
        self._history_event(timeline, stored)

    def _history_event(self, timeline: int, stored: StoredObject) -> None:
        h = stored.header
        name = history_name(timeline)
        self.outbox.put(
            WalHistoryArchived(
                event_id=event_id_for(
                    self.cluster, "wal.history.archived", name, h.plaintext_sha256 or ""
                ),
                occurred_at=now(),
                cluster=self.cluster,
                system_id=self.system_id,
                segment=name,
                timeline=timeline,
                size=h.plaintext_size or 0,
                stored_size=stored.stored_size,
                sha256=h.plaintext_sha256 or "",
                key_id=h.key_id,
                path=self.archive.relative(stored.path),
            )
        )
        self.wake()

    def gap(self, timeline: int, start: int, end: int, reason: str) -> None:
        """WAL between ``start`` and ``end`` cannot be archived any more: say so loudly."""
        self.outbox.put(
            WalGapDetected(
                event_id=event_id_for(
                    self.cluster, "wal.gap.detected", str(timeline), str(start), str(end)
                ),
                occurred_at=now(),
                cluster=self.cluster,
                system_id=self.system_id,
                timeline=timeline,
                from_lsn=str(Lsn(start)),
                to_lsn=str(Lsn(end)),
                reason=reason,
            )
        )
        self.wake()

    def reconcile(self, seg_size: int) -> None:
        """Re-announce the newest archived segment, closed partials and history files.

        A crash between making a segment durable and writing its event loses at most the newest
        announcement; re-announcing it on start (same deterministic id) closes that window.
        """
        segs = self.archive.list_segments(seg_size)
        if segs:
            last: WalSegment = segs[-1]
            path = self.archive.segment_path(last.name)
            stored = StoredObject(self.archive.header(path), path, path.stat().st_size, False)
            self._segment_event(
                last.name, last.timeline, last.start_lsn, last.end_lsn, stored, False
            )
            self.state.last_closed_segment = last.name
        for name in self.archive.list_partials()[-2:]:
            path = self.archive.segment_path(name)
            header = self.archive.header(path)
            seg = WalSegment.parse(name.removesuffix(".partial"), seg_size)
            end = int(Lsn.parse(header.extra.get("end_lsn", str(Lsn(seg.end_lsn)))))
            stored = StoredObject(header, path, path.stat().st_size, False)
            self._segment_event(name, seg.timeline, seg.start_lsn, end, stored, True)
        for tli in self.archive.list_history():
            path = self.archive.history_path(tli)
            stored = StoredObject(self.archive.header(path), path, path.stat().st_size, False)
            self._history_event(tli, stored)
