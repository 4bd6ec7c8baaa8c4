"""Checks of a PostgreSQL server's version and settings, and GUC size parsing."""

from __future__ import annotations

import re

from klio_common.errors import UnsupportedServer

MIN_SERVER_VERSION_NUM = 150000

# Memory units PostgreSQL accepts in GUC values (case-sensitive, as the server is).
_SIZE_UNITS = {"B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")
_WAL_LEVELS = {"replica", "logical", "archive", "hot_standby"}


def format_server_version(server_version_num: int) -> str:
    """Human form of ``server_version_num``: ``150004`` → ``15.4``, ``90624`` → ``9.6.24``."""
    if server_version_num >= 100000:
        return f"{server_version_num // 10000}.{server_version_num % 10000}"
    major, rest = divmod(server_version_num, 10000)
    return f"{major}.{rest // 100}.{rest % 100}"


def check_server_version(server_version_num: int) -> int:
    """Refuse servers older than PostgreSQL 15.

    Args:
        server_version_num: the server's ``server_version_num`` setting, e.g. ``150004``.

    Returns:
        The major version (15, 16, ...).

    Raises:
        UnsupportedServer: the server is older than 15.
    """
    if server_version_num < MIN_SERVER_VERSION_NUM:
        version = format_server_version(server_version_num)
        raise UnsupportedServer(
            f"PostgreSQL {version} is not supported: Klio needs PostgreSQL 15 or later",
            hint="upgrade the cluster to PostgreSQL 15 or later (pg_upgrade), then try again",
        )
    return server_version_num // 10000


def check_wal_level(value: str) -> str:
    """Refuse a ``wal_level`` too low for physical replication.

    Args:
        value: the server's ``wal_level`` setting.

    Returns:
        The value, lower-cased.

    Raises:
        UnsupportedServer: ``minimal`` (or an unknown value).
    """
    level = value.strip().lower()
    if level == "minimal":
        raise UnsupportedServer(
            "wal_level is minimal: Klio needs wal_level replica or logical to stream WAL",
            hint="set wal_level = replica in postgresql.conf and restart PostgreSQL",
        )
    if level not in _WAL_LEVELS:
        raise UnsupportedServer(
            f"unknown wal_level {value!r}: Klio needs wal_level replica or logical",
            hint="set wal_level = replica in postgresql.conf and restart PostgreSQL",
        )
    return level


def parse_size(text: str, default_unit: str = "B") -> int:
    """Parse a GUC memory size such as ``16MB``, ``1GB`` or ``8kB`` into bytes.

    Units are PostgreSQL's and case-sensitive: ``B``, ``kB``, ``MB``, ``GB``, ``TB``.

    Args:
        text: the setting as ``SHOW`` prints it.
        default_unit: the unit of a bare number (a GUC's base unit, e.g. ``"kB"``).

    Returns:
        The size in bytes.

    Raises:
        ValueError: not a size, or an unknown unit.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a whole number and a unit, as in '16MB'")
    unit = match.group(2) or default_unit
    if unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}: unit {unit!r} is not one of B, kB, MB, GB, TB")
    return int(match.group(1)) * _SIZE_UNITS[unit]
