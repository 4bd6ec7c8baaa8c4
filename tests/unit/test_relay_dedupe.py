"""The relay's pure decisions: upload, skip, fetch to compare, or conflict (never overwrite);
and whether a PUT's answer proves what the bucket stored."""

from __future__ import annotations

from hashlib import md5

import pytest

from klio_common.storage.s3 import ObjectInfo, Stored, composite_checksum, sha256_checksum
from klio_relay.dedupe import META_PLAINTEXT_SHA256, Action, Local, Remote, decide
from klio_relay.upload import _proven

DATA = b"stored object bytes"
LOCAL = Local(
    size=len(DATA),
    sha256="a" * 64,
    checksum=sha256_checksum(DATA),
    plaintext_sha256="p" * 64,
)


def test_a_free_key_is_uploaded() -> None:
    assert decide(LOCAL, None).action is Action.UPLOAD


def test_the_same_checksum_and_size_is_skipped() -> None:
    remote = Remote(size=LOCAL.size, checksum=LOCAL.checksum)
    assert decide(LOCAL, remote).action is Action.SKIP
    # A multipart object of the same parts carries a '-<parts>' suffix.
    big = b"x" * (11 << 20)
    local = Local(
        size=len(big),
        sha256="b" * 64,
        checksum=composite_checksum(big, 5 << 20),
        plaintext_sha256=None,
    )
    assert (
        decide(local, Remote(size=len(big), checksum=local.checksum + "-3")).action is Action.SKIP
    )


def test_the_same_plaintext_stored_another_way_is_skipped() -> None:
    remote = Remote(size=99, checksum="other", plaintext_sha256=LOCAL.plaintext_sha256)
    decision = decide(LOCAL, remote)
    assert decision.action is Action.SKIP and "same content" in decision.reason


@pytest.mark.parametrize(
    "remote",
    [
        Remote(size=LOCAL.size, checksum=sha256_checksum(b"other bytes of that size!")),
        Remote(size=LOCAL.size + 1, checksum=LOCAL.checksum),  # same checksum, other size
        Remote(size=LOCAL.size, checksum="zzz", plaintext_sha256="q" * 64),
        Remote(size=3, checksum=None, sha256="c" * 64),  # downloaded and hashed: different
    ],
    ids=["other-checksum", "other-size", "other-plaintext", "other-bytes"],
)
def test_other_content_is_a_conflict(remote: Remote) -> None:
    decision = decide(LOCAL, remote)
    assert decision.action is Action.CONFLICT
    assert "other" in decision.reason


def test_an_unsettled_checksum_asks_for_the_bytes() -> None:
    assert decide(LOCAL, Remote(size=LOCAL.size, checksum=None)).action is Action.FETCH
    multipart = Remote(size=LOCAL.size, checksum="abc-2")  # parts of another size
    assert decide(LOCAL, multipart).action is Action.FETCH
    fetched = Remote(size=LOCAL.size, checksum=None, sha256=LOCAL.sha256)
    assert decide(LOCAL, fetched).action is Action.SKIP


def test_remote_reads_our_metadata_from_a_head_answer() -> None:
    info = ObjectInfo("k", 5, "c", {META_PLAINTEXT_SHA256: "p" * 64})
    assert Remote.of(info) == Remote(size=5, checksum="c", plaintext_sha256="p" * 64)
    assert Remote.of(ObjectInfo("k", 5), "d" * 64).sha256 == "d" * 64


async def test_an_upload_is_proven_by_the_servers_checksum_or_else_its_etag() -> None:
    etag = f'"{md5(DATA).hexdigest()}"'
    # A server that checks S3 checksums answers with ours: proven, whatever the ETag says.
    assert await _proven(Stored(etag='"kms"', checksum_sha256=LOCAL.checksum), LOCAL, DATA)
    assert not await _proven(Stored(etag=etag, checksum_sha256="other"), LOCAL, DATA)
    # One that ignores the header: the MD5 it computed of what it stored must be ours.
    assert await _proven(Stored(etag=etag), LOCAL, DATA)
    assert not await _proven(Stored(etag=f'"{md5(b"other").hexdigest()}"'), LOCAL, DATA)
    assert not await _proven(Stored(etag=None), LOCAL, DATA)  # nothing proven: HEAD
