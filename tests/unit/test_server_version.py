"""Tests of klio_common.pg.server."""

from __future__ import annotations

import pytest

from klio_common.errors import Permanent, UnsupportedServer
from klio_common.pg import check_server_version, check_wal_level, parse_size
from klio_common.pg.server import format_server_version


@pytest.mark.parametrize(("num", "major"), [(150000, 15), (150004, 15), (160002, 16), (180000, 18)])
def test_supported_versions(num: int, major: int) -> None:
    assert check_server_version(num) == major


@pytest.mark.parametrize(
    ("num", "shown"), [(140009, "14.9"), (149999, "14.9999"), (100000, "10.0"), (90624, "9.6.24")]
)
def test_old_versions_refused(num: int, shown: str) -> None:
    with pytest.raises(UnsupportedServer) as info:
        check_server_version(num)
    assert info.value.message == (
        f"PostgreSQL {shown} is not supported: Klio needs PostgreSQL 15 or later"
    )
    assert info.value.hint and "upgrade" in info.value.hint
    assert isinstance(info.value, Permanent)


def test_format_server_version() -> None:
    assert format_server_version(150004) == "15.4"
    assert format_server_version(90624) == "9.6.24"


@pytest.mark.parametrize("level", ["replica", "logical", "REPLICA", " replica\n", "hot_standby"])
def test_wal_level_accepted(level: str) -> None:
    assert check_wal_level(level) == level.strip().lower()


def test_wal_level_minimal_refused() -> None:
    with pytest.raises(UnsupportedServer) as info:
        check_wal_level("minimal")
    assert "wal_level is minimal" in info.value.message
    assert info.value.hint == "set wal_level = replica in postgresql.conf and restart PostgreSQL"
    assert "HINT: set wal_level = replica" in str(info.value)


def test_wal_level_unknown_refused() -> None:
    with pytest.raises(UnsupportedServer, match="unknown wal_level 'full'"):
        check_wal_level("full")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16MB", 16 << 20),
        ("1GB", 1 << 30),
        ("8kB", 8192),
        ("8192", 8192),
        ("512B", 512),
        ("2TB", 2 << 40),
        (" 64 MB ", 64 << 20),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_default_unit() -> None:
    assert parse_size("128", default_unit="kB") == 128 * 1024


@pytest.mark.parametrize("text", ["", "MB", "16mb", "16 KB", "1.5GB", "-1", "16MiB", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)
