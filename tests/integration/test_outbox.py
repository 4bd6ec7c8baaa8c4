"""The outbox against a real nats-server: events wait on disk while NATS is down, then drain."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest
from nats.js import api

from klio_common.errors import Retryable
from klio_common.events import BackupRequested, codec, now, subjects
from klio_common.runtime import metrics
from klio_common.runtime.bus import Bus
from klio_common.runtime.outbox import Outbox
from klio_common.runtime.settings import NatsSettings
from klio_dev import NatsServer
from klio_dev.waiting import wait_until_async

pytestmark = pytest.mark.integration


def request(n: int) -> BackupRequested:
    return BackupRequested(
        event_id=f"req/{n}",  # a slash must not become a directory
        occurred_at=now(),
        cluster="main",
        system_id="0",
        request_id=str(n),
        requested_by="test",
    )


async def stream_ids(bus: Bus) -> list[str]:
    """The event ids stored in the stream, in stream order."""
    info = await bus.jetstream.stream_info(subjects.STREAM)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await bus.jetstream.get_msg(subjects.STREAM, seq)
        assert raw.data is not None
        ids.append(codec.decode(raw.data).event_id)
    return ids


def test_put_writes_ordered_private_files(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox" / "relay", file_mode=0o600, dir_mode=0o700)
    assert outbox.pending() == []
    paths = [outbox.put(request(n)) for n in range(5)]
    assert outbox.pending() == paths
    assert [codec.decode(p.read_bytes()).event_id for p in paths] == [f"req/{n}" for n in range(5)]
    assert all(p.parent == outbox.directory for p in paths)
    assert stat.S_IMODE(paths[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(outbox.directory.stat().st_mode) == 0o700
    # a temp file left by a crash mid-write is not an event
    (outbox.directory / ".00000000000000000000-x.json.tmp-abc").write_bytes(b"{")
    assert outbox.pending() == paths
    sample = metrics.registry().get_sample_value(
        "klio_outbox_pending", {"outbox": str(outbox.directory)}
    )
    assert sample == 5


async def test_drain_publishes_in_order_and_deletes(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    bus = await Bus.connect(NatsSettings(url=nats_server.url), name="test")
    try:
        await bus.ensure_stream()
        outbox = Outbox(tmp_path)
        for n in range(3):
            outbox.put(request(n))
        broken = tmp_path / "99999999999999999999-broken.json"
        broken.write_bytes(b"not an event")
        assert await outbox.drain(bus) == 3
        assert outbox.pending() == []
        assert broken.with_suffix(".rejected").exists()
        assert await stream_ids(bus) == ["req/0", "req/1", "req/2"]
    finally:
        await bus.close()


async def test_outbox_holds_events_while_nats_is_down_and_drains_after(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await Bus.connect(NatsSettings(url=nats_server.url), name="test")
    outbox = Outbox(tmp_path)
    stop, wake = asyncio.Event(), asyncio.Event()
    attempts = 0

    def bus_getter() -> Bus:
        nonlocal attempts
        attempts += 1
        return bus

    try:
        await bus.ensure_stream()
        nats_server.stop()
        for n in range(3):
            outbox.put(request(n))
        with pytest.raises(Retryable):
            await outbox.drain(bus)
        assert len(outbox.pending()) == 3

        caplog.set_level(logging.INFO, logger="klio_common.runtime.outbox")
        runner = asyncio.create_task(outbox.run(bus_getter, stop, wake))
        await wait_until_async(lambda: attempts >= 4, 60, "several drain attempts")
        assert len(outbox.pending()) == 3
        outage_logs = [r for r in caplog.records if "kept in the outbox" in r.getMessage()]
        assert len(outage_logs) == 1

        nats_server.start()
        await wait_until_async(lambda: not outbox.pending(), 60, "the outbox to drain")
        assert await stream_ids(bus) == ["req/0", "req/1", "req/2"]
        assert any("NATS answers again" in r.getMessage() for r in caplog.records)

        # the service wakes the loop after each put
        outbox.put(request(3))
        wake.set()
        await wait_until_async(lambda: not outbox.pending(), 60, "the woken drain")
        assert (await stream_ids(bus))[-1] == "req/3"

        stop.set()
        await asyncio.wait_for(runner, 30)
    finally:
        stop.set()
        await bus.close()


async def test_a_repeated_drain_is_deduplicated(nats_server: NatsServer, tmp_path: Path) -> None:
    """A crash after the ack but before the delete publishes again: JetStream drops it."""
    bus = await Bus.connect(NatsSettings(url=nats_server.url), name="test")
    try:
        await bus.ensure_stream()
        outbox = Outbox(tmp_path)
        path = outbox.put(request(1))
        data = path.read_bytes()
        assert await outbox.drain(bus) == 1
        path.write_bytes(data)  # as if the delete had not happened
        assert await outbox.drain(bus) == 1
        info = await bus.jetstream.stream_info(subjects.STREAM)
        assert info.state.messages == 1
        assert info.config.storage == api.StorageType.FILE
    finally:
        await bus.close()
