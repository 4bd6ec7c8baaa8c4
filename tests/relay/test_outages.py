"""Nothing is lost when things fail: a frozen bucket, kill -9, a NATS restart, lost events."""

from __future__ import annotations

import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from klio_common.runtime.settings import Settings
from klio_common.storage.layout import chunk_path, manifest_path
from klio_common.storage.tier2state import JOURNAL, UNKNOWN_SHA256, Tier2Entry, Tier2State
from klio_dev import NatsServer
from klio_dev.waiting import wait_until
from tests.fixtures.paths import BUCKET, KlioConfigWriter, Volume, fill
from tests.relay.helpers import (
    CHUNK,
    RelayProcess,
    announce_backup,
    assert_bucket_mirrors,
    bucket_objects,
    cluster_dir,
    http_get,
    load,
    make_backup,
    relay_inprocess,
    sample,
    service_url,
    stream_events,
    wait_in_bucket,
    wal_paths,
)
from tests.wal_receiver.helpers import archive_of, close_segment, receiver_inprocess

pytestmark = pytest.mark.integration


@contextmanager
def load_running(pg: Any, seconds: float) -> Iterator[None]:
    """pgbench in the background, plus a segment switch now and then so segments keep closing."""
    pg.pgbench_init(scale=2)
    done = threading.Event()

    def switch() -> None:
        while not done.wait(1.0):
            pg.switch_wal()

    bench = threading.Thread(target=pg.pgbench, kwargs={"clients": 2, "seconds": seconds})
    switcher = threading.Thread(target=switch)
    bench.start()
    switcher.start()
    try:
        yield
    finally:
        bench.join()
        done.set()
        switcher.join()


def _close_all(pg: Any, settings: Any) -> set[str]:
    close_segment(pg, settings)
    return wal_paths(settings)


def _dead_letters(nats_url: str) -> list[dict[str, Any]]:
    return [
        d for d in stream_events(nats_url, "klio.main.deadletter") if d["service"] == "klio-relay"
    ]


def test_a_frozen_bucket_delays_but_loses_nothing(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    config = klio_config(
        pg=pg,
        nats=nats_server,
        tier1=tier1_dir,
        s3=s3_server,
        keys=keyring_files,
        extra={"relay": {"reconcile_interval": 5}},
    )
    settings = load(config)
    readyz = service_url(settings, "/readyz")
    terminated = sample(
        "klio_bus_messages_total", durable="relay--wal-segment-closed", outcome="dead-lettered"
    )
    with receiver_inprocess(settings), relay_inprocess(settings):
        wait_until(lambda: http_get(readyz)[0] == 200, 60, "/readyz to be 200")
        with load_running(pg, 30):
            wait_until(lambda: len(bucket_objects(s3_server)) >= 2, 60, "the first uploads")
            assert s3_server.pid is not None
            os.kill(s3_server.pid, signal.SIGSTOP)  # the endpoint stops answering
            try:
                wait_until(lambda: http_get(readyz)[0] == 503, 60, "/readyz to be 503")
                assert "bucket unreachable" in http_get(readyz)[1]
                wait_until(
                    lambda: sample("klio_relay_lag_segments", cluster="main") >= 3,
                    60,
                    "the lag to grow",
                )
                assert sample("klio_relay_lag_seconds", cluster="main") > 0
            finally:
                os.kill(s3_server.pid, signal.SIGCONT)
        paths = _close_all(pg, settings)
        wait_in_bucket(s3_server, {f"main/{p}" for p in paths}, timeout=180)
        wait_until(lambda: sample("klio_relay_lag_segments", cluster="main") == 0, 60, "no lag")
        wait_until(lambda: http_get(readyz)[0] == 200, 60, "/readyz to be 200 again")
    assert_bucket_mirrors(s3_server, settings, paths, "main/")
    assert _dead_letters(nats_server.url) == []
    assert terminated == sample(
        "klio_bus_messages_total", durable="relay--wal-segment-closed", outcome="dead-lettered"
    )


def test_kill_9_and_a_nats_restart_lose_nothing_and_overwrite_nothing(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    # With versioning on, an overwrite would leave a second version: there must be none.
    s3_server.client().put_bucket_versioning(
        Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"}
    )
    config = klio_config(
        pg=pg,
        nats=nats_server,
        tier1=tier1_dir,
        s3=s3_server,
        keys=keyring_files,
        extra={"relay": {"reconcile_interval": 5}},
    )
    settings = load(config)
    relay = RelayProcess(config, workdir / "relay.log")
    with receiver_inprocess(settings):
        relay.start()
        try:
            with load_running(pg, 20):
                wait_until(lambda: len(bucket_objects(s3_server)) >= 3, 60, "some uploads")
                relay.kill()  # mid-stream: uploads and acks in flight are cut short
                wait_until(lambda: len(wal_paths(settings)) >= 10, 60, "more segments")
                nats_server.stop()
                wait_until(
                    lambda: len(wal_paths(settings)) >= 13, 60, "segments while NATS is down"
                )
                nats_server.start()
            segments = archive_of(settings).list_segments()
            backup = make_backup(
                settings,
                "20260104T000000Z",
                {"base/5/1": secrets.token_bytes(3 * CHUNK)},
                segments[0].name,
                segments[-1].name,
            )
            announce_backup(nats_server.url, backup)  # published while the relay is down
            paths = _close_all(pg, settings)
            relay.start()
            expected = paths | {chunk_path(c) for f in backup.files for c in f.chunks}
            expected |= {manifest_path(backup.id)}
            wait_in_bucket(s3_server, {f"main/{p}" for p in expected}, timeout=180)
        finally:
            assert relay.stop() == 0, (workdir / "relay.log").read_text()[-3000:]
    assert_bucket_mirrors(s3_server, settings, expected, "main/")
    versions = s3_server.client().list_object_versions(Bucket=BUCKET)["Versions"]
    keys = [v["Key"] for v in versions]
    assert len(keys) == len(set(keys)), "an object was written twice"
    assert _dead_letters(nats_server.url) == []


def test_events_lost_for_good_are_made_good_by_reconciliation(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    klio_config: KlioConfigWriter,
    workdir: Path,
) -> None:
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, s3=s3_server)
    settings = load(config)
    with receiver_inprocess(settings):
        pg.execute("CREATE TABLE t AS SELECT generate_series(1, 10000) x")
        paths = _close_all(pg, settings)
        segments = archive_of(settings).list_segments()
    backup = make_backup(
        settings,
        "20260105T000000Z",
        {"base/5/1": secrets.token_bytes(2 * CHUNK)},
        segments[0].name,
        segments[-1].name,
    )
    # A NATS that never saw any of it: every event about these objects is gone.
    fresh = NatsServer(workdir, name="nats-fresh").start()
    try:
        lost = Settings.load(config, {"KLIO_NATS__URL": fresh.url})
        with relay_inprocess(lost):
            expected = paths | {chunk_path(c) for f in backup.files for c in f.chunks}
            expected |= {manifest_path(backup.id)}
            wait_in_bucket(s3_server, {f"main/{p}" for p in expected})
            wait_until(
                lambda: any(
                    e["backup_id"] == backup.id
                    for e in stream_events(fresh.url, "klio.main.tier2.backup.relayed")
                ),
                60,
                "tier2.backup.relayed on the new NATS",
            )
        relayed = {e["segment"] for e in stream_events(fresh.url, "klio.main.tier2.wal.relayed")}
    finally:
        fresh.stop()
    assert {p.rsplit("/", 1)[1] for p in paths} <= relayed
    assert_bucket_mirrors(s3_server, settings, expected, "main/")


def test_a_lost_journal_is_rebuilt_from_the_bucket_without_sending_again(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    tier1_dir: Path,
    klio_config: KlioConfigWriter,
) -> None:
    settings = load(klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, s3=s3_server))
    with receiver_inprocess(settings):
        pg.execute("CREATE TABLE t AS SELECT generate_series(1, 10000) x")
        for _ in range(3):
            paths = _close_all(pg, settings)
    with relay_inprocess(settings):
        wait_in_bucket(s3_server, {f"main/{p}" for p in paths})
        wait_until(lambda: sample("klio_relay_lag_segments", cluster="main") == 0, 30, "no lag")
    root = cluster_dir(settings)
    (root / JOURNAL).unlink()
    gone = sorted(paths)[0]
    (root / gone).unlink()  # as retention would, once it is on Tier 2
    puts = sample("klio_relay_requests_total", op="put")
    heads = sample("klio_relay_requests_total", op="head")
    with relay_inprocess(settings):
        wait_until(lambda: (root / JOURNAL).exists(), 60, "the journal to be rebuilt")
        state = Tier2State(root)
        wait_until(lambda: state.load() >= len(paths), 60, "every object journaled again")
    assert {e.path for e in state} == paths
    assert state.get(gone) == Tier2Entry(
        gone, UNKNOWN_SHA256, bucket_objects(s3_server)[f"main/{gone}"]
    )
    assert sample("klio_relay_requests_total", op="put") == puts  # checked by HEAD, not sent
    assert sample("klio_relay_requests_total", op="head") >= heads + len(paths) - 1


def test_a_full_tier1_holds_the_announcements_back_and_loses_nothing(
    pg: Any,
    nats_server: Any,
    s3_server: Any,
    small_volume: Callable[..., Volume],
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    volume = small_volume(96)
    config = klio_config(
        pg=pg,
        nats=nats_server,
        tier1=volume.path,
        s3=s3_server,
        keys=keyring_files,
        extra={"relay": {"reconcile_interval": 5}},
    )
    settings = load(config)
    with receiver_inprocess(settings):
        for _ in range(3):
            pg.execute("CREATE TABLE IF NOT EXISTS t (v int); INSERT INTO t VALUES (1)")
            paths = _close_all(pg, settings)
    ballast = volume.path / "ballast"
    fill(ballast)  # whatever filled it: no byte left for the outbox
    with relay_inprocess(settings):
        wait_in_bucket(s3_server, {f"main/{p}" for p in paths})
        wait_until(
            lambda: any("no space left on device" in r.getMessage() for r in caplog.records),
            60,
            "the relay to say the volume is full",
        )
        readyz = service_url(settings, "/readyz")
        wait_until(lambda: http_get(readyz)[0] == 503, 60, "the relay to be unready")
        assert "tier1: no space left on device" in http_get(readyz)[1]
        ballast.unlink()
        wait_until(lambda: set(paths) <= {e.path for e in _journal(settings)}, 60, "the journal")
        segments = {p.rsplit("/", 1)[1] for p in paths if "." not in p.rsplit("/", 1)[1]}
        wait_until(
            lambda: segments <= _relayed(nats_server.url), 60, "every segment announced relayed"
        )
        wait_until(lambda: http_get(readyz)[0] == 200, 60, "the relay to be ready again")
    assert_bucket_mirrors(s3_server, settings, paths, "main/")
    assert _dead_letters(nats_server.url) == []


def _journal(settings: Settings) -> list[Tier2Entry]:
    state = Tier2State(cluster_dir(settings))
    state.load()
    return list(state)


def _relayed(nats_url: str) -> set[str]:
    return {e["segment"] for e in stream_events(nats_url, "klio.main.tier2.wal.relayed")}
