"""wal-restore's Tier-2 fallback: which tier serves, and which errors stop recovery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject, NotFound, Retryable
from klio_restore import walfetch

NAME = "000000010000000000000003"


class Bucket:
    """What `walfetch.sources` needs of a `BucketWal`: ``read`` and ``where``."""

    where = "s3://b/main/"

    def __init__(self, files: dict[str, bytes], error: Exception | None = None) -> None:
        self.files = files
        self.error = error
        self.reads: list[str] = []

    def read(self, name: str, keyring: KeyRing) -> bytes:
        self.reads.append(name)
        if self.error is not None:
            raise self.error
        if name not in self.files:
            raise NotFound(f"{name} is not in the bucket")
        return self.files[name]


def _chain(archive: WalArchive | None, bucket: Bucket, log: list[str]) -> list[walfetch.Source]:
    made: Any = lambda: bucket  # noqa: E731 - a factory, as ClusterContext.bucket_wal
    return walfetch.sources(archive, KeyRing.none(), made, log=log.append)


def _archive(tmp_path: Path, content: bytes | None) -> WalArchive:
    archive = WalArchive(tmp_path, "main")
    archive.cluster_dir.mkdir(parents=True)
    if content is not None:
        from klio_common import compression

        archive.store_segment(NAME, content, codec=compression.get("none"), keyring=KeyRing.none())
    return archive


def test_tier1_serves_first_and_the_bucket_is_not_touched(tmp_path: Path) -> None:
    bucket, log = Bucket({NAME: b"remote"}), list[str]()
    chain = _chain(_archive(tmp_path, b"local"), bucket, log)
    assert walfetch.lookup(NAME, chain) == b"local"
    assert bucket.reads == [] and log == []


def test_the_bucket_serves_what_tier1_lacks(tmp_path: Path) -> None:
    bucket, log = Bucket({NAME: b"remote"}), list[str]()
    chain = _chain(_archive(tmp_path, None), bucket, log)
    assert walfetch.lookup(NAME, chain) == b"remote"
    assert log == [f"{NAME} restored from Tier 2 (s3://b/main/)"]
    assert walfetch.lookup("000000010000000000000004", chain) is None  # in neither: missing


def test_a_corrupt_tier1_copy_falls_back(tmp_path: Path) -> None:
    archive = _archive(tmp_path, b"local")
    path = archive.segment_path(NAME)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x55
    path.write_bytes(bytes(data))
    bucket, log = Bucket({NAME: b"remote"}), list[str]()
    assert walfetch.lookup(NAME, _chain(archive, bucket, log)) == b"remote"
    assert "the Tier-1 copy is unusable" in log[0] and "restored from Tier 2" in log[1]
    # Corrupt on Tier 1 and absent from the bucket: the Tier-1 error, never "missing".
    with pytest.raises(CorruptObject):
        walfetch.lookup(NAME, _chain(archive, Bucket({}), []))


def test_bucket_errors_stop_recovery(tmp_path: Path) -> None:
    for error in (Retryable("bucket unreachable"), CorruptObject("bucket object is corrupt")):
        chain = _chain(_archive(tmp_path / type(error).__name__, None), Bucket({}, error), [])
        with pytest.raises(type(error)):
            walfetch.lookup(NAME, chain)


def test_without_tier1_only_the_bucket_is_read(tmp_path: Path) -> None:
    for archive in (None, WalArchive(tmp_path / "gone", "main")):
        bucket = Bucket({NAME: b"remote"})
        assert walfetch.lookup(NAME, _chain(archive, bucket, [])) == b"remote"
    with pytest.raises(NotFound):
        walfetch.sources(None, KeyRing.none())
