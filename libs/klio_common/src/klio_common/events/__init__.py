"""Klio's events: the public wire contract between services (msgspec Structs, JSON, no I/O)."""

from typing import TypeAlias

from klio_common.events.backup import BackupDone, BackupFailed, BackupRequested, BackupStarted
from klio_common.events.base import DeadLetter, Event, now, tag_of
from klio_common.events.retention import RetentionBackupExpired, RetentionWalPruned
from klio_common.events.tier2 import Tier2BackupRelayed, Tier2WalRelayed
from klio_common.events.wal import WalGapDetected, WalHistoryArchived, WalSegmentClosed

ALL_EVENTS: tuple[type[Event], ...] = (
    WalSegmentClosed,
    WalHistoryArchived,
    WalGapDetected,
    BackupRequested,
    BackupStarted,
    BackupDone,
    BackupFailed,
    Tier2WalRelayed,
    Tier2BackupRelayed,
    RetentionBackupExpired,
    RetentionWalPruned,
    DeadLetter,
)

AnyEvent: TypeAlias = (
    WalSegmentClosed
    | WalHistoryArchived
    | WalGapDetected
    | BackupRequested
    | BackupStarted
    | BackupDone
    | BackupFailed
    | Tier2WalRelayed
    | Tier2BackupRelayed
    | RetentionBackupExpired
    | RetentionWalPruned
    | DeadLetter
)

__all__ = [
    "ALL_EVENTS",
    "AnyEvent",
    "BackupDone",
    "BackupFailed",
    "BackupRequested",
    "BackupStarted",
    "DeadLetter",
    "Event",
    "RetentionBackupExpired",
    "RetentionWalPruned",
    "Tier2BackupRelayed",
    "Tier2WalRelayed",
    "WalGapDetected",
    "WalHistoryArchived",
    "WalSegmentClosed",
    "now",
    "tag_of",
]
