"""WAL to the bucket under load: every closed segment arrives, verified, announced and journaled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from klio_common.storage.layout import wal_path
from klio_common.storage.tier2state import Tier2State
from klio_dev.waiting import wait_until
from tests.fixtures.paths import KlioConfigWriter
from tests.relay.helpers import (
    assert_bucket_mirrors,
    bucket_objects,
    cluster_dir,
    http_get,
    load,
    relay_inprocess,
    sample,
    service_url,
    stream_events,
    wait_in_bucket,
    wal_paths,
)
from tests.wal_receiver.helpers import close_segment, receiver_inprocess

pytestmark = pytest.mark.integration
RELAYED = "klio.main.tier2.wal.relayed"


@pytest.mark.parametrize(
    ("encrypted", "prefix"), [(True, "prod/"), (False, "")], ids=["zstd+aes", "plain"]
)
def test_every_closed_segment_reaches_the_bucket(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    encrypted: bool,
    prefix: str,
) -> None:
    config = klio_config(
        pg=pg,
        nats=nats_server,
        tier1=tier1_dir,
        s3=s3_server,
        prefix=prefix,
        keys=keyring_files if encrypted else None,
        compression="zstd" if encrypted else "none",
        # Plain segments are 16 MiB: above a 5 MiB threshold they go up in parts.
        extra={"relay": {"reconcile_interval": 30, "multipart_threshold": 5 * 1024 * 1024}},
    )
    parts = sample("klio_relay_requests_total", op="multipart_part")
    settings = load(config)
    with receiver_inprocess(settings), relay_inprocess(settings):
        wait_until(
            lambda: http_get(service_url(settings, "/readyz"))[0] == 200, 60, "/readyz to be 200"
        )
        pg.pgbench_init(scale=5)
        pg.pgbench(clients=4, transactions=400)
        close_segment(pg, settings)
        paths = wal_paths(settings)
        assert len(paths) >= 4, paths
        wait_in_bucket(s3_server, {f"{prefix}main/{p}" for p in paths})
        segments = {p.rsplit("/", 1)[1] for p in paths}
        wait_until(
            lambda: segments <= {e["segment"] for e in stream_events(nats_server.url, RELAYED)},
            60,
            "a tier2.wal.relayed event for every segment",
        )
        wait_until(lambda: sample("klio_relay_lag_segments", cluster="main") == 0, 30, "no lag")
        metrics_text = http_get(service_url(settings, "/metrics"))[1]
    if encrypted:
        assert 'klio_relay_requests_total{op="put"}' in metrics_text  # zstd: small segments
    else:
        assert sample("klio_relay_requests_total", op="multipart_part") >= parts + 3 * len(paths)
    assert "klio_relay_lag_seconds" in metrics_text
    assert_bucket_mirrors(s3_server, settings, paths, f"{prefix}main/")
    for event in stream_events(nats_server.url, RELAYED):
        assert event["key"] == f"{prefix}main/{wal_path(event['segment'])}"
        assert event["system_id"] == str(pg.system_identifier())
    # The journal lists every relayed file, as a restarted relay will read it.
    state = Tier2State(cluster_dir(settings))
    state.load()
    assert paths <= {entry.path for entry in state}
    # Nothing the relay must not copy went up (the open partial, status, outbox, journal).
    uploaded = {k.removeprefix(f"{prefix}main/") for k in bucket_objects(s3_server, "")}
    assert all(u.startswith("wal/") and not u.startswith("wal/open/") for u in uploaded), uploaded
    assert all(wal_path(u.rsplit("/", 1)[1]) == u for u in uploaded), uploaded
