"""The service around the stream: health and metrics endpoints, and loud gap reports."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from klio_common.pg.lsn import Lsn
from klio_dev.ports import free_port
from klio_dev.waiting import wait_until
from tests.services import stream_events
from tests.wal_receiver.helpers import (
    archive_of,
    load,
    receiver_inprocess,
    wait_archived,
    write_config,
)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet (or any more)


def test_health_and_metrics_endpoints(
    pg: Any, nats_server: Any, tier1_dir: Path, keyring_files: dict[str, Path], workdir: Path
) -> None:
    port = free_port()
    config = write_config(
        workdir / "k.yaml",
        pg=pg,
        nats_url=nats_server.url,
        tier1=tier1_dir,
        keys=keyring_files,
        http_port=port,
    )
    settings = load(config)
    base = f"http://127.0.0.1:{port}"
    with receiver_inprocess(settings):
        wait_until(lambda: _get(f"{base}/readyz")[0] == 200, 60, "/readyz to answer 200")
        assert _get(f"{base}/livez")[0] == 200
        end = pg.current_lsn()
        pg.switch_wal()
        wait_archived(settings, end)
        wait_until(
            lambda: 'klio_wal_segments_closed_total{cluster="main"}' in _get(f"{base}/metrics")[1],
            30,
            "the segments metric",
        )
        metrics = _get(f"{base}/metrics")[1]
        assert 'klio_wal_streaming{cluster="main"} 1.0' in metrics
        assert "klio_wal_bytes_received_total" in metrics
        wait_until(
            lambda: (archive_of(settings).read_status() or {}).get("state") == "streaming",
            30,
            "status.json to say streaming",
        )
        pg.stop()
        wait_until(lambda: _get(f"{base}/readyz")[0] == 503, 60, "/readyz to answer 503")
        assert "stream:main" in _get(f"{base}/readyz")[1]
        pg.start()
        wait_until(lambda: _get(f"{base}/readyz")[0] == 200, 60, "the stream to come back")


def test_lost_wal_is_reported_as_a_gap(
    pg: Any, nats_server: Any, tier1_dir: Path, workdir: Path
) -> None:
    config = write_config(
        workdir / "k.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=None
    )
    settings = load(config)
    with receiver_inprocess(settings):
        end = pg.current_lsn()
        pg.switch_wal()
        wait_archived(settings, end)
    archived_until = max(s.end_lsn for s in archive_of(settings).list_segments())
    # While the receiver is away its slot is dropped and the server recycles the WAL after it.
    pg.execute("SELECT pg_drop_replication_slot('klio')")
    pg.execute("CREATE TABLE filler AS SELECT g FROM generate_series(1, 10) g")
    for _ in range(4):
        pg.execute("INSERT INTO filler SELECT g FROM generate_series(1, 1000) g")
        pg.switch_wal()
    pg.execute("CHECKPOINT")
    pg.execute("CHECKPOINT")
    with receiver_inprocess(settings):
        wait_until(lambda: _gap_events(nats_server.url) != [], 60, "a gap event")
        end = pg.current_lsn()
        pg.switch_wal()
        wait_archived(settings, end)
    gaps = _gap_events(nats_server.url)
    assert gaps and Lsn.parse(gaps[0]["from_lsn"]) == archived_until
    assert Lsn.parse(gaps[0]["to_lsn"]) > archived_until


def _gap_events(nats_url: str) -> list[dict[str, Any]]:
    return stream_events(nats_url, "klio.main.wal.gap.detected")
