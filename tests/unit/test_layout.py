"""The bucket layout: keys mirror the Tier-1 paths, and only data paths are relayable."""

from __future__ import annotations

from pathlib import Path

import pytest

from klio_common.catalog.backups import BackupCatalog
from klio_common.catalog.chunks import ChunkStore
from klio_common.catalog.wal import WalArchive
from klio_common.compression import get
from klio_common.crypto import KeyRing
from klio_common.storage.layout import (
    DEDUP_KEY,
    IDENTITY,
    BucketLayout,
    Kind,
    chunk_path,
    kind_of,
    manifest_path,
    normalize_prefix,
    wal_path,
)

SEGMENT = "000000020000000A000000FF"
CHUNK = "ab12" + "0" * 60


def test_relative_paths_are_the_tier1_paths(tmp_path: Path) -> None:
    archive = WalArchive(tmp_path, "main")
    assert wal_path(SEGMENT) == archive.relative(archive.segment_path(SEGMENT))
    assert wal_path(f"{SEGMENT}.partial") == archive.relative(
        archive.segment_path(f"{SEGMENT}.partial")
    )
    assert wal_path("00000002.history") == archive.relative(archive.history_path(2))
    store = ChunkStore(tmp_path / "main", KeyRing.none(), get("none"))
    assert chunk_path(CHUNK) == store.path(CHUNK).relative_to(tmp_path / "main").as_posix()
    assert store.dedup_key_path.relative_to(tmp_path / "main").as_posix() == DEDUP_KEY
    catalog = BackupCatalog(tmp_path / "main", KeyRing.none(), get("none"))
    manifest = catalog.manifest_path("20260101T000000Z")
    assert manifest_path("20260101T000000Z") == manifest.relative_to(tmp_path / "main").as_posix()
    assert archive.identity_path.relative_to(tmp_path / "main").as_posix() == IDENTITY


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        (f"wal/{SEGMENT[:16]}/{SEGMENT}", Kind.WAL),
        (f"wal/{SEGMENT[:16]}/{SEGMENT}.partial", Kind.PARTIAL),
        ("wal/history/00000002.history", Kind.HISTORY),
        (f"chunks/ab/{CHUNK}", Kind.CHUNK),
        ("chunks/dedup.key", Kind.DEDUP_KEY),
        ("backups/20260101T000000Z/manifest", Kind.MANIFEST),
        ("identity.json", Kind.IDENTITY),
        # Work in progress and bookkeeping stay on Tier 1.
        (f"wal/open/{SEGMENT}.partial", None),
        ("wal/status.json", None),
        ("backups/20260101T000000Z/lease.json", None),
        ("backups/20260101T000000Z/progress.json", None),
        ("outbox/relay/1-x.json", None),
        ("tier2/journal", None),
        (f"chunks/ac/{CHUNK}", None),  # not where that id lives
        (f"wal/0000000100000000/{SEGMENT}", None),
        (f"chunks/ab/.{CHUNK}.tmp-0a1b2c", None),
        ("", None),
    ],
)
def test_kind_of_accepts_only_data_paths(path: str, kind: Kind | None) -> None:
    assert kind_of(path) is kind


def test_keys_are_prefix_cluster_and_path() -> None:
    layout = BucketLayout.of("prod", "main")
    assert layout.cluster_prefix == "prod/main/"
    assert layout.wal_key(SEGMENT) == f"prod/main/wal/{SEGMENT[:16]}/{SEGMENT}"
    assert layout.chunk_key(CHUNK) == f"prod/main/chunks/ab/{CHUNK}"
    assert layout.manifest_key("b1") == "prod/main/backups/b1/manifest"
    assert layout.backups_prefix == "prod/main/backups/"
    assert layout.identity_key == "prod/main/identity.json"
    assert layout.dedup_key_key == "prod/main/chunks/dedup.key"
    assert layout.relative(layout.wal_key(SEGMENT)) == wal_path(SEGMENT)
    assert BucketLayout.of("", "main").key("identity.json") == "main/identity.json"


@pytest.mark.parametrize(
    ("prefix", "normal"),
    [("", ""), ("/", ""), ("prod", "prod/"), ("prod/", "prod/"), ("a/b//", "a/b/")],
)
def test_prefixes_are_normalized(prefix: str, normal: str) -> None:
    assert normalize_prefix(prefix) == normal


def test_bad_names_and_paths_are_refused() -> None:
    layout = BucketLayout.of("", "main")
    for bad in ("", "/etc/passwd", "wal/../../other/identity.json", "a//b", "./x"):
        with pytest.raises(ValueError):
            layout.key(bad)
    for key in ("other/identity.json", "main/", "mainx/identity.json"):
        with pytest.raises(ValueError):
            layout.relative(key)
    with pytest.raises(ValueError):
        BucketLayout.of("", "a/b")
    for call, arg in ((wal_path, "nope"), (chunk_path, "ABC"), (manifest_path, "../x")):
        with pytest.raises(ValueError):
            call(arg)
