"""PostgreSQL vocabulary: LSNs, WAL file names, timeline histories and server checks (no I/O)."""

from klio_common.pg.lsn import Lsn
from klio_common.pg.server import check_server_version, check_wal_level, parse_size
from klio_common.pg.timeline import HistoryEntry, TimelineHistory
from klio_common.pg.walname import (
    WalSegment,
    history_name,
    is_history_name,
    is_partial_name,
    is_segment_name,
    parse_history_name,
    segments_between,
    validate_seg_size,
)

__all__ = [
    "HistoryEntry",
    "Lsn",
    "TimelineHistory",
    "WalSegment",
    "check_server_version",
    "check_wal_level",
    "history_name",
    "is_history_name",
    "is_partial_name",
    "is_segment_name",
    "parse_history_name",
    "parse_size",
    "segments_between",
    "validate_seg_size",
]
