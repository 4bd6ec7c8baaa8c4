"""The S3 client against a real moto server: conditional writes, checksums, reads, listings."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import pytest

from klio_common.errors import NotFound, Permanent
from klio_common.runtime.settings import S3Settings
from klio_common.storage.s3 import (
    MIN_PART_SIZE,
    BucketUnavailable,
    S3Store,
    composite_checksum,
    same_checksum,
    sha256_checksum,
)
from klio_dev.ports import free_port
from tests.fixtures.paths import BUCKET

pytestmark = pytest.mark.integration


def _settings(s3: Any, **overrides: Any) -> S3Settings:
    values = {"bucket": BUCKET, "endpoint_url": s3.endpoint_url, "region": "us-east-1"}
    return S3Settings(**{**values, **overrides})


async def test_put_if_absent_never_overwrites_and_head_returns_the_checksum(s3_server: Any) -> None:
    calls: list[tuple[str, int]] = []
    async with S3Store(_settings(s3_server), observer=lambda op, n: calls.append((op, n))) as store:
        await store.check()
        data = secrets.token_bytes(1000)
        assert await store.put_if_absent("a/b", data, metadata={"klio-kind": "wal"})
        assert not await store.put_if_absent("a/b", b"other bytes")
        info = await store.head("a/b")
        assert info is not None
        assert info.size == 1000
        assert same_checksum(info.checksum_sha256, sha256_checksum(data))
        assert info.metadata == {"klio-kind": "wal"}
        assert await store.get("a/b") == data
        assert await store.head("a/missing") is None
        with pytest.raises(NotFound):
            await store.get("a/missing")
        await store.delete("a/b")
        assert await store.head("a/b") is None
    assert ("put_object", 1000) in calls and ("put_object", len(b"other bytes")) in calls


async def test_a_put_is_verified_by_the_md5_the_server_computed(s3_server: Any) -> None:
    data = secrets.token_bytes(5000)
    md5 = hashlib.md5(data).digest()
    async with S3Store(_settings(s3_server)) as store:
        stored = await store.put_if_absent("v/ok", data, md5=md5)
        assert stored is not None and stored.verified(md5)
        assert not stored.verified(hashlib.md5(b"other bytes").digest())
        # Our Content-MD5 may be refused by the server (AWS) or ignored (moto); either way
        # the ETag is what the server computed, so a wrong claim never verifies.
        wrong = hashlib.md5(b"not the body").digest()
        try:
            claimed = await store.put_if_absent("v/wrong", data, md5=wrong)
        except Permanent:
            claimed = None
        assert claimed is None or not claimed.verified(wrong)


async def test_multipart_uploads_store_the_composite_checksum(s3_server: Any) -> None:
    data = secrets.token_bytes(2 * MIN_PART_SIZE + 123)
    async with S3Store(_settings(s3_server)) as store:
        assert await store.put_multipart_if_absent("big", data, part_size=MIN_PART_SIZE)
        assert not await store.put_multipart_if_absent("big", data, part_size=MIN_PART_SIZE)
        info = await store.head("big")
        assert info is not None and info.size == len(data)
        assert same_checksum(info.checksum_sha256, composite_checksum(data, MIN_PART_SIZE))
        assert hashlib.sha256(await store.get("big")).digest() == hashlib.sha256(data).digest()
        with pytest.raises(ValueError, match="below S3's minimum"):
            await store.put_multipart_if_absent("small", data, part_size=1024)
    uploads = s3_server.client().list_multipart_uploads(Bucket=BUCKET)
    assert not uploads.get("Uploads"), "the refused upload was not aborted"


async def test_listing_pages_through_every_key_under_a_prefix(s3_server: Any) -> None:
    client = s3_server.client()
    for i in range(1005):  # more than one page of 1000
        client.put_object(Bucket=BUCKET, Key=f"p/{i:05d}", Body=b"x")
    client.put_object(Bucket=BUCKET, Key="q/other", Body=b"y")
    async with S3Store(_settings(s3_server)) as store:
        keys = [info.key async for info in store.list("p/")]
    assert keys == [f"p/{i:05d}" for i in range(1005)]


@pytest.mark.parametrize("problem", ["bucket", "endpoint"])
async def test_check_names_the_problem_with_a_hint(s3_server: Any, problem: str) -> None:
    if problem == "bucket":
        settings = _settings(s3_server, bucket="not-there")
        expected = "bucket 'not-there' does not exist at http://127.0.0.1"
    else:
        settings = _settings(s3_server, endpoint_url=f"http://127.0.0.1:{free_port()}")
        expected = "bucket unreachable: listing the bucket: cannot reach http://127.0.0.1"
    async with S3Store(settings, connect_timeout=2, attempts=1) as store:
        with pytest.raises(BucketUnavailable) as caught:
            await store.check()
        with pytest.raises(BucketUnavailable):
            await store.put_if_absent("k", b"data")
    assert caught.value.reason.startswith(expected), caught.value.reason
    assert caught.value.hint
