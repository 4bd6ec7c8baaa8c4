"""Waiting until the WAL archive holds every segment a backup needs: a backup counts only then."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from klio_common.catalog.wal import WalArchive
from klio_common.errors import IdentityMismatch, Retryable
from klio_common.pg.walname import WalSegment, segments_between

log = logging.getLogger("klio.basebackup")

POLL_EVERY = 1.0


def wal_range(timeline: int, start_lsn: int, end_lsn: int, seg_size: int) -> list[WalSegment]:
    """The segments holding ``[start_lsn, end_lsn)`` on ``timeline`` (at least one)."""
    return list(segments_between(timeline, start_lsn, max(end_lsn, start_lsn + 1), seg_size))


def check_identity(archive: WalArchive, system_id: str, backup_id: str) -> None:
    """Refuse a backup of a server whose WAL is not the archive's.

    Raises:
        IdentityMismatch: the archive belongs to another system identifier.
    """
    ident = archive.read_identity()
    if ident is not None and ident.system_id != system_id:
        raise IdentityMismatch(
            f"backup {backup_id} is of PostgreSQL system {system_id} but the WAL archive of "
            f"cluster '{archive.cluster}' belongs to system {ident.system_id}",
            hint="give each PostgreSQL cluster its own cluster name; check the cluster's conninfo",
        )


def missing(archive: WalArchive, segments: list[WalSegment]) -> list[WalSegment]:
    """The segments of ``segments`` that are not complete in the archive."""
    return [s for s in segments if not archive.segment_path(s.name).exists()]


async def wait_for_wal(
    archive: WalArchive,
    segments: list[WalSegment],
    *,
    backup_id: str,
    timeout: float,
    wake: asyncio.Event | None = None,
    on_poll: Callable[[int], None] | None = None,
) -> None:
    """Poll the archive each second (or when ``wake`` is set) until every segment is complete.

    Args:
        archive: the cluster's WAL archive.
        segments: the backup's WAL range, in order.
        backup_id: named in the error.
        timeout: seconds before giving up.
        wake: set (e.g. on ``wal.segment.closed``) to look again at once.
        on_poll: told how many segments are still missing after each look.

    Raises:
        Retryable: a segment was still missing after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    waiting = list(segments)
    while True:
        waiting = await asyncio.to_thread(missing, archive, waiting)
        if on_poll is not None:
            on_poll(len(waiting))
        if not waiting:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Retryable(
                f"WAL segment {waiting[0].name} needed by backup {backup_id} was not archived "
                f"within {timeout:g} s",
                hint="is klio-wal-receiver running for this cluster? check 'klio wal status'; "
                "backup.wal_timeout sets how long a backup waits for its WAL",
            )
        if wake is not None:
            wake.clear()
            try:
                await asyncio.wait_for(wake.wait(), min(POLL_EVERY, remaining))
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(min(POLL_EVERY, remaining))
