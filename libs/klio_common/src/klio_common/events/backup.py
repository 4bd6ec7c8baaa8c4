"""Events of base backups: the request from the klio command and the basebackup's answers."""

from __future__ import annotations

from typing import Annotated

import msgspec

from klio_common.events.base import ByteCount, Count, Event, LsnText, NonEmpty, Timeline, UtcTime

BackupId = Annotated[str, msgspec.Meta(min_length=1, description="the backup's id")]


class BackupRequested(Event, frozen=True, tag="backup.requested"):
    """Someone asked for a base backup now.

    Published by ``klio backup run``; the basebackup service answers with ``backup.started``
    carrying the same ``request_id``.
    """

    request_id: Annotated[NonEmpty, msgspec.Meta(description="the requester's id for this ask")]
    requested_by: Annotated[str, msgspec.Meta(description="who asked (user, host, schedule)")]


class BackupStarted(Event, frozen=True, tag="backup.started"):
    """A base backup has started on the primary (BASE_BACKUP returned its start LSN).

    Published by the basebackup service; ``request_id`` is null for scheduled backups.
    """

    backup_id: BackupId
    request_id: Annotated[
        str | None, msgspec.Meta(description="the request it answers, null when scheduled")
    ]
    timeline: Timeline
    start_lsn: Annotated[LsnText, msgspec.Meta(description="backup start position")]


class BackupDone(Event, frozen=True, tag="backup.done"):
    """A base backup is committed to the Tier-1 catalog and every WAL segment it needs is stored.

    Published by the basebackup service.
    """

    backup_id: BackupId
    timeline: Timeline
    start_lsn: Annotated[LsnText, msgspec.Meta(description="backup start position")]
    end_lsn: Annotated[LsnText, msgspec.Meta(description="backup end position")]
    start_time: Annotated[UtcTime, msgspec.Meta(description="when the backup started")]
    end_time: Annotated[UtcTime, msgspec.Meta(description="when the backup ended")]
    size: Annotated[ByteCount, msgspec.Meta(description="plaintext bytes of the backup")]
    stored_size: Annotated[ByteCount, msgspec.Meta(description="bytes of its stored objects")]
    new_chunk_bytes: Annotated[
        ByteCount, msgspec.Meta(description="stored bytes of chunks this backup added")
    ]
    chunks_total: Annotated[Count, msgspec.Meta(description="chunks the backup references")]
    chunks_new: Annotated[Count, msgspec.Meta(description="chunks not stored before")]


class BackupFailed(Event, frozen=True, tag="backup.failed"):
    """A base backup failed; nothing of it is visible in the catalog.

    Published by the basebackup service.
    """

    backup_id: BackupId
    reason: Annotated[str, msgspec.Meta(description="the error, as the service logged it")]
    request_id: Annotated[
        NonEmpty | None,
        msgspec.Meta(description="the request that asked for this backup; null when scheduled"),
    ] = None
