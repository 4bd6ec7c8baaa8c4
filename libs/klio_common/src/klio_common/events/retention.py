"""Events of deletions, published by the retention service."""

from __future__ import annotations

from typing import Annotated

import msgspec

from klio_common.events.base import ByteCount, Count, Event, SegmentName, Tier, Timeline


class RetentionBackupExpired(Event, frozen=True, tag="retention.backup.expired"):
    """A base backup was deleted from one tier by the retention policy.

    Published by the retention service once the deletion is done.
    """

    backup_id: Annotated[str, msgspec.Meta(min_length=1, description="the backup's id")]
    tier: Tier
    reason: Annotated[str, msgspec.Meta(description="the policy rule that expired it")]


class RetentionWalPruned(Event, frozen=True, tag="retention.wal.pruned"):
    """A run of WAL segments of one timeline was deleted from one tier.

    Published by the retention service once the deletion is done; no retained backup needs them.
    """

    tier: Tier
    timeline: Timeline
    first_segment: Annotated[SegmentName, msgspec.Meta(description="first segment deleted")]
    last_segment: Annotated[SegmentName, msgspec.Meta(description="last segment deleted")]
    count: Annotated[Count, msgspec.Meta(description="segments deleted")]
    bytes: Annotated[ByteCount, msgspec.Meta(description="stored bytes freed")]
