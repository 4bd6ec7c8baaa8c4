"""Bad input: wrong credentials, bucket or endpoint; other content under our key; corrupt Tier 1."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from klio_common.storage.layout import wal_path
from klio_dev import S3Server
from klio_dev.ports import free_port
from klio_dev.waiting import wait_until
from tests.fixtures.paths import BUCKET, KlioConfigWriter
from tests.relay.helpers import (
    bucket_bytes,
    bucket_objects,
    cluster_dir,
    http_get,
    load,
    relay_inprocess,
    sample,
    service_url,
    stream_events,
    wait_in_bucket,
)
from tests.wal_receiver.helpers import archive_of, close_segment, receiver_inprocess

pytestmark = pytest.mark.integration
NO_PG = {"clusters": [{"name": "main", "conninfo": "host=/nonexistent"}]}


def _not_ready_because(settings: Any, words: str) -> str:
    readyz = service_url(settings, "/readyz")
    wait_until(lambda: words in http_get(readyz)[1], 60, f"/readyz to say {words!r}")
    status, body = http_get(readyz)
    assert status == 503, body
    return body


def test_wrong_credentials_are_a_clear_error_and_keep_the_relay_unready(
    nats_server: Any,
    tier1_dir: Path,
    klio_config: KlioConfigWriter,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Moto checks credentials once its first request (creating the bucket) is done.
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "1")
    server = S3Server(workdir, name="s3-auth").start()
    try:
        server.create_bucket(BUCKET)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        settings = load(klio_config(nats=nats_server, tier1=tier1_dir, s3=server, extra=NO_PG))
        with caplog.at_level(logging.ERROR), relay_inprocess(settings):
            body = _not_ready_because(settings, "refused the credentials")
            assert "InvalidAccessKeyId" in body
            assert "consumers: waiting for the bucket" in body
        errors = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
        assert errors, caplog.text
        assert "AWS_ACCESS_KEY_ID" in str(getattr(errors[0], "hint", ""))
    finally:
        server.stop()


@pytest.mark.parametrize("problem", ["missing bucket", "no endpoint"])
def test_a_missing_bucket_or_endpoint_says_so(
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    klio_config: KlioConfigWriter,
    problem: str,
) -> None:
    if problem == "missing bucket":
        config = klio_config(
            nats=nats_server, tier1=tier1_dir, s3=s3_server, bucket="no-such-bucket", extra=NO_PG
        )
        expected = "bucket 'no-such-bucket' does not exist"
    else:
        config = klio_config(nats=nats_server, tier1=tier1_dir, s3=s3_server, extra=NO_PG)
        text = config.read_text().replace(s3_server.endpoint_url, f"http://127.0.0.1:{free_port()}")
        config.write_text(text)
        expected = "bucket unreachable"
    settings = load(config)
    with relay_inprocess(settings):
        _not_ready_because(settings, expected)


def _archive_some(pg: Any, settings: Any) -> list[str]:
    with receiver_inprocess(settings):
        pg.execute("CREATE TABLE t (x int)")
        for _ in range(4):
            pg.execute("INSERT INTO t SELECT generate_series(1, 1000)")
            close_segment(pg, settings)
    return [s.name for s in archive_of(settings).list_segments()]


def test_other_content_under_our_key_is_alerted_and_never_overwritten(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    s3_server.client().put_bucket_versioning(
        Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"}
    )
    settings = load(klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, s3=s3_server))
    names = _archive_some(pg, settings)
    clash, same = f"main/{wal_path(names[1])}", f"main/{wal_path(names[2])}"
    client = s3_server.client()
    client.put_object(Bucket=BUCKET, Key=clash, Body=b"somebody else's segment")
    client.put_object(
        Bucket=BUCKET, Key=same, Body=(cluster_dir(settings) / wal_path(names[2])).read_bytes()
    )
    conflicts = sample("klio_relay_conflicts_total")
    skipped = sample("klio_relay_objects_skipped_total")
    with relay_inprocess(settings):
        others = {f"main/{wal_path(n)}" for n in names if f"main/{wal_path(n)}" != clash}
        wait_in_bucket(s3_server, others)
        wait_until(
            lambda: any(names[1] in d["reason"] for d in stream_events(nats_server.url, DEAD)),
            60,
            "a dead letter naming the segment",
        )
        wait_until(lambda: sample("klio_relay_conflicts_total") > conflicts, 30, "the metric")
        assert sample("klio_relay_objects_skipped_total") > skipped
        assert http_get(service_url(settings, "/readyz"))[0] == 200
    letter = next(d for d in stream_events(nats_server.url, DEAD) if names[1] in d["reason"])
    assert "differs" in letter["reason"] and letter["service"] == "klio-relay"
    assert bucket_bytes(s3_server, clash) == b"somebody else's segment"
    versions = client.list_object_versions(Bucket=BUCKET, Prefix=clash)["Versions"]
    assert len(versions) == 1


def test_a_corrupt_segment_on_tier1_is_never_uploaded_and_is_alerted(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    settings = load(
        klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, s3=s3_server, keys=keyring_files)
    )
    names = _archive_some(pg, settings)
    bad = wal_path(names[2])
    target = cluster_dir(settings) / bad
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside a frame
    target.write_bytes(bytes(data))
    corrupt = sample("klio_relay_corrupt_objects_total")
    with relay_inprocess(settings):
        wait_in_bucket(s3_server, {f"main/{wal_path(n)}" for n in names if wal_path(n) != bad})
        wait_until(
            lambda: any(names[2] in d["reason"] for d in stream_events(nats_server.url, DEAD)),
            60,
            "a dead letter naming the segment",
        )
        assert sample("klio_relay_corrupt_objects_total") > corrupt
        assert sample("klio_relay_lag_segments", cluster="main") >= 1  # it is still missing
    assert f"main/{bad}" not in bucket_objects(s3_server)
    letter = next(d for d in stream_events(nats_server.url, DEAD) if names[2] in d["reason"])
    assert "corrupt" in letter["reason"]


DEAD = "klio.main.deadletter"
