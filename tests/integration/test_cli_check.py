"""``klio check`` and ``klio events tail`` against real servers, as processes and in-process."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from klio_cli.events import tail
from klio_common.catalog.wal import WalArchive
from klio_common.events import WalSegmentClosed, codec, now
from klio_common.runtime.bus import Bus
from klio_common.runtime.settings import Settings
from klio_dev import (
    NatsServer,
    PostgresServer,
    wait_until_async,
)
from tests.fixtures.paths import KlioConfigWriter, Volume, fill
from tests.integration.cli import (
    SEG,
    klio,
)

pytestmark = pytest.mark.integration


# -- check ------------------------------------------------------------------------------------


async def test_check_against_real_servers(
    pg: PostgresServer,
    nats_server: NatsServer,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, keys=keyring_files)
    settings = Settings.load(config, {})
    bus = await Bus.connect(settings.nats, name="test")
    await bus.ensure_stream()
    await bus.close()

    done = await asyncio.to_thread(klio, "check", "--json", config=config)
    results = {r["name"]: r for r in json.loads(done.stdout)}
    assert done.returncode == 0, done.stdout
    for name in (
        "config",
        "keys",
        "nats",
        "stream",
        "main/postgres",
        "main/version",
        "main/wal_level",
        "main/replication role",
        "main/system identifier",
        "main/tier1",
    ):
        assert results[name]["status"] == "ok", results[name]
    assert results["main/slot"]["status"] == "warn"  # the receiver creates it
    assert "tier2" not in results

    pg.execute("SELECT pg_create_physical_replication_slot('klio')")
    archive = WalArchive(tier1_dir, "main")
    archive.ensure_identity(pg.system_identifier(), SEG, 150000, int(time.time()))
    done = await asyncio.to_thread(klio, "check", config=config)
    assert done.returncode == 0, done.stdout
    assert "ok main/slot: physical slot 'klio'" in done.stdout
    assert f"ok main/system identifier: {pg.system_identifier()} matches" in done.stdout


async def test_check_fails_fast_with_reasons(
    pg: PostgresServer,
    nats_server: NatsServer,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, keys=keyring_files)
    WalArchive(tier1_dir, "main").ensure_identity(42, SEG, 150000, int(time.time()))
    pg.execute("ALTER ROLE klio NOREPLICATION")
    done = await asyncio.to_thread(klio, "check", config=config)
    assert done.returncode == 1
    assert "FAIL stream: stream KLIO does not exist" in done.stdout
    assert "FAIL main/replication role:" in done.stdout

    pg.execute("ALTER ROLE klio REPLICATION")
    done = await asyncio.to_thread(klio, "check", config=config)
    assert "FAIL main/system identifier:" in done.stdout
    assert "belongs to system 42" in done.stdout

    nats_server.stop()
    pg.stop()
    done = await asyncio.to_thread(klio, "check", config=config)
    assert done.returncode == 1
    assert "FAIL nats: cannot connect to NATS" in done.stdout
    assert "FAIL main/postgres: " in done.stdout
    assert "ok main/tier1:" in done.stdout

    broken = klio_config(
        pg=pg,
        tier1=tier1_dir,
        extra={"compression": {"level": 99}},
        path=tier1_dir.parent / "broken.yaml",
    )
    done = await asyncio.to_thread(klio, "check", config=broken)
    assert done.returncode == 1
    assert done.stdout.startswith("FAIL config: invalid configuration")


# -- events tail ------------------------------------------------------------------------------


async def test_events_tail_prints_events_from_the_start_and_live(
    nats_server: NatsServer, klio_config: KlioConfigWriter, tier1_dir: Path
) -> None:
    settings = Settings.load(klio_config(nats=nats_server, tier1=tier1_dir), {})
    bus = await Bus.connect(settings.nats, name="test")
    await bus.ensure_stream()

    def event(cluster: str, segment: str) -> WalSegmentClosed:
        return WalSegmentClosed(
            event_id=codec.event_id_for(cluster, segment),
            occurred_at=now(),
            cluster=cluster,
            system_id="1",
            segment=segment,
            timeline=1,
            start_lsn="0/1000000",
            end_lsn="0/2000000",
            size=SEG,
            stored_size=100,
            sha256="0" * 64,
            key_id=None,
            compression="zstd",
            path=f"wal/0000000100000000/{segment}",
        )

    await bus.publish_event(event("main", "000000010000000000000001"))
    await bus.publish_event(event("other", "000000010000000000000002"))
    out = io.StringIO()
    stop = asyncio.Event()
    with redirect_stdout(out):
        task = asyncio.create_task(
            tail(settings, "klio.main.>", as_json=True, from_start=True, stop=stop)
        )
        await wait_until_async(
            lambda: "000000010000000000000001" in out.getvalue(), 10, "the first event"
        )
        await bus.publish_event(event("main", "000000010000000000000003"))
        await wait_until_async(
            lambda: "000000010000000000000003" in out.getvalue(), 10, "the live event"
        )
        stop.set()
        await task
    await bus.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"]["segment"] for line in lines] == [
        "000000010000000000000001",
        "000000010000000000000003",
    ]
    assert lines[0]["subject"] == "klio.main.wal.segment.closed"


async def test_check_reports_the_free_space_of_tier1(
    pg: PostgresServer,
    nats_server: NatsServer,
    small_volume: Callable[..., Volume],
    klio_config: KlioConfigWriter,
) -> None:
    volume = small_volume(40)
    config = klio_config(pg=pg, nats=nats_server, tier1=volume.path)
    done = await asyncio.to_thread(klio, "check", config=config)
    assert f"ok main/tier1: {volume.path} is writable; 40 MiB free of 40 MiB" in done.stdout

    filler = volume.path / "filler"
    filler.write_bytes(bytes(37 << 20))
    done = await asyncio.to_thread(klio, "check", config=config)
    assert f"WARN main/tier1: {volume.path} is writable; 3 MiB free of 40 MiB (93% used)" in (
        done.stdout
    ), done.stdout
    assert "HINT: grow the volume" in done.stdout

    filler.unlink()
    fill(filler)
    done = await asyncio.to_thread(klio, "check", config=config)
    assert done.returncode == 1
    assert f"FAIL main/tier1: {volume.path}: the volume is full" in done.stdout, done.stdout
