"""Events of the Tier-2 copy, published by the relay."""

from __future__ import annotations

from typing import Annotated

import msgspec

from klio_common.events.base import ByteCount, Count, Event, Sha256Hex, WalFileName


class Tier2WalRelayed(Event, frozen=True, tag="tier2.wal.relayed"):
    """A WAL file (segment, closed partial segment or history file) is stored in the bucket.

    Published by the relay after the upload is verified (also when it was already there).
    """

    segment: Annotated[WalFileName, msgspec.Meta(description="the WAL file name")]
    key: Annotated[str, msgspec.Meta(min_length=1, description="object key in the bucket")]
    sha256: Annotated[Sha256Hex, msgspec.Meta(description="SHA-256 of the plaintext, hex")]
    size: Annotated[ByteCount, msgspec.Meta(description="plaintext bytes")]


class Tier2BackupRelayed(Event, frozen=True, tag="tier2.backup.relayed"):
    """A base backup is complete in the bucket: its chunks, manifest and WAL range are there.

    Published by the relay.
    """

    backup_id: Annotated[str, msgspec.Meta(min_length=1, description="the backup's id")]
    objects_uploaded: Annotated[Count, msgspec.Meta(description="objects sent")]
    objects_skipped: Annotated[Count, msgspec.Meta(description="objects already in the bucket")]
    bytes_uploaded: Annotated[ByteCount, msgspec.Meta(description="bytes sent")]
