"""Events of the WAL archive, published by the wal-receiver."""

from __future__ import annotations

from typing import Annotated

import msgspec

from klio_common.events.base import (
    ByteCount,
    Event,
    HistoryName,
    LsnText,
    Sha256Hex,
    Timeline,
)

KeyId = Annotated[
    str | None, msgspec.Meta(description="id of the encryption key, null when not encrypted")
]
Tier1Path = Annotated[
    str,
    msgspec.Meta(
        min_length=1, description="path of the object relative to the cluster's Tier-1 dir"
    ),
]


class WalSegmentClosed(Event, frozen=True, tag="wal.segment.closed"):
    """A WAL segment is stored on Tier 1, complete (or as a closed ``.partial``).

    Published by the wal-receiver once the object is durable on the volume. ``partial`` is true
    for the last segment of a timeline the server left before filling it, stored and named
    ``<segment>.partial``; ``end_lsn`` is then where its WAL ends.
    """

    segment: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[0-9A-F]{24}(\.partial)?$",
            description="the segment's file name; ends in '.partial' exactly when partial is true",
            examples=["000000010000000000000003", "000000010000000000000003.partial"],
        ),
    ]
    timeline: Timeline
    start_lsn: Annotated[LsnText, msgspec.Meta(description="first position in the segment")]
    end_lsn: Annotated[
        LsnText, msgspec.Meta(description="first position after the WAL the segment holds")
    ]
    size: Annotated[ByteCount, msgspec.Meta(description="plaintext bytes")]
    stored_size: Annotated[ByteCount, msgspec.Meta(description="bytes of the stored object")]
    sha256: Annotated[Sha256Hex, msgspec.Meta(description="SHA-256 of the plaintext, hex")]
    key_id: KeyId
    compression: Annotated[str, msgspec.Meta(description="codec of the stored object")]
    path: Tier1Path
    partial: Annotated[bool, msgspec.Meta(description="a closed .partial segment")] = False

    def __post_init__(self) -> None:
        if self.partial != self.segment.endswith(".partial"):
            raise ValueError("segment must end in '.partial' exactly when partial is true")


class WalHistoryArchived(Event, frozen=True, tag="wal.history.archived"):
    """A timeline history file is stored on Tier 1.

    Published by the wal-receiver when it follows a new timeline (after a failover or promotion).
    """

    segment: Annotated[HistoryName, msgspec.Meta(description="the history file name")]
    timeline: Timeline
    size: Annotated[ByteCount, msgspec.Meta(description="plaintext bytes")]
    stored_size: Annotated[ByteCount, msgspec.Meta(description="bytes of the stored object")]
    sha256: Annotated[Sha256Hex, msgspec.Meta(description="SHA-256 of the plaintext, hex")]
    key_id: KeyId
    path: Tier1Path


class WalGapDetected(Event, frozen=True, tag="wal.gap.detected"):
    """WAL between two positions is missing from the archive and cannot be received any more.

    Published by the wal-receiver, e.g. when the slot was lost or a failover skipped WAL that
    was never streamed. Backups that need this range cannot be restored past it.
    """

    timeline: Timeline
    from_lsn: Annotated[LsnText, msgspec.Meta(description="first missing position")]
    to_lsn: Annotated[LsnText, msgspec.Meta(description="first position available again")]
    reason: Annotated[str, msgspec.Meta(description="why the WAL is missing")]
