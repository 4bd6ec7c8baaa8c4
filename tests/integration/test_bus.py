"""The JetStream bus against a real nats-server: stream, dedup, outcome mapping, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from nats.aio.msg import Msg
from nats.js import api

from klio_common.errors import Permanent, Retryable
from klio_common.events import BackupRequested, DeadLetter, Event, codec, now, subjects
from klio_common.runtime.bus import DUPLICATE_WINDOW, MAX_AGE, Bus
from klio_common.runtime.settings import NatsSettings
from klio_dev import NatsServer, free_port
from klio_dev.waiting import wait_until_async

pytestmark = pytest.mark.integration


def request(request_id: str, cluster: str = "main") -> BackupRequested:
    return BackupRequested(
        event_id=f"req-{request_id}",
        occurred_at=now(),
        cluster=cluster,
        system_id="7312345678901234567",
        request_id=request_id,
        requested_by="test",
    )


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    connected = await Bus.connect(NatsSettings(url=nats_server.url), name="test")
    await connected.ensure_stream()
    yield connected
    await connected.close()


class Consumer:
    """Runs ``bus.consume`` in a task and records what the handler saw."""

    def __init__(self, bus: Bus, durable: str, filter_subject: str, **options: Any) -> None:
        self.stop = asyncio.Event()
        self.seen: list[tuple[Event, int]] = []
        self.behaviour: Callable[[Event, int], Awaitable[None]] | None = None
        self.task = asyncio.create_task(
            bus.consume(
                durable=durable,
                filter_subject=filter_subject,
                handler=self.handle,
                stop=self.stop,
                **options,
            )
        )

    async def handle(self, event: Event, msg: Msg) -> None:
        delivered = msg.metadata.num_delivered
        self.seen.append((event, delivered))
        if self.behaviour is not None:
            await self.behaviour(event, delivered)

    def ids(self) -> list[str]:
        return [event.event_id for event, _ in self.seen]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


async def test_ensure_stream_creates_it_once(bus: Bus) -> None:
    await bus.ensure_stream()  # the fixture already made it: a second call changes nothing
    info = await bus.jetstream.stream_info(subjects.STREAM)
    assert info.config.storage == api.StorageType.FILE
    assert info.config.subjects == ["klio.>"]
    assert info.config.duplicate_window == DUPLICATE_WINDOW
    assert info.config.max_age == MAX_AGE


async def test_ensure_stream_updates_an_existing_stream_and_keeps_its_messages(
    nats_server: NatsServer,
) -> None:
    bus = await Bus.connect(NatsSettings(url=nats_server.url), name="test")
    try:
        await bus.jetstream.add_stream(
            name=subjects.STREAM, subjects=["klio.main.>"], duplicate_window=5, max_age=60
        )
        await bus.jetstream.publish("klio.main.backup.requested", b"{}")
        await bus.ensure_stream()
        info = await bus.jetstream.stream_info(subjects.STREAM)
        assert info.config.subjects == ["klio.>"]
        assert info.config.duplicate_window == DUPLICATE_WINDOW
        assert info.config.max_age == MAX_AGE
        assert info.state.messages == 1
    finally:
        await bus.close()


async def test_ensure_stream_refuses_a_memory_stream(nats_server: NatsServer) -> None:
    bus = await Bus.connect(NatsSettings(url=nats_server.url), name="test")
    try:
        await bus.jetstream.add_stream(
            name=subjects.STREAM, subjects=["klio.>"], storage=api.StorageType.MEMORY
        )
        with pytest.raises(Permanent, match="needs file storage") as caught:
            await bus.ensure_stream()
        assert caught.value.hint is not None and "nats stream rm KLIO" in caught.value.hint
    finally:
        await bus.close()


async def test_publish_is_deduplicated_by_msg_id(bus: Bus) -> None:
    assert await bus.publish("klio.main.backup.requested", b"{}", "same-id") is False
    assert await bus.publish("klio.main.backup.requested", b"{}", "same-id") is True
    event = request("r1")
    assert await bus.publish_event(event) is False
    assert await bus.publish_event(event) is True
    info = await bus.jetstream.stream_info(subjects.STREAM)
    assert info.state.messages == 2


async def test_connect_to_an_absent_server_is_retryable() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(Retryable, match=re.escape(f"cannot connect to NATS at {url}")) as caught:
        await Bus.connect(NatsSettings(url=url, connect_timeout=1), name="test")
    assert caught.value.hint is not None


async def test_publish_while_nats_is_down_is_retryable(nats_server: NatsServer) -> None:
    bus = await Bus.connect(NatsSettings(url=nats_server.url), name="test")
    try:
        await bus.ensure_stream()
        nats_server.stop()
        with pytest.raises(
            Retryable, match=re.escape("cannot publish to klio.main.backup.requested")
        ):
            await bus.publish_event(request("r1"))
        nats_server.start()
        await wait_until_async(lambda: bus.is_connected, 30, "the bus to reconnect")
        assert await bus.publish_event(request("r1")) is False
    finally:
        await bus.close()


async def test_consume_acks_naks_and_dead_letters(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    async def behaviour(event: Event, delivered: int) -> None:
        assert isinstance(event, BackupRequested)
        kind = event.request_id
        if kind == "retryable" and delivered == 1:
            raise Retryable("primary not reachable yet")
        if kind == "crash" and delivered == 1:
            raise RuntimeError("a bug")
        if kind == "permanent":
            raise Permanent("never works")
        if kind == "always":
            raise Retryable("still not there")

    letters = Consumer(bus, "test--deadletter", subjects.all_clusters(DeadLetter))
    # ack_wait is long: a redelivery seen within the test's deadline can only come from a nak.
    main = Consumer(
        bus,
        "test--backup-requested",
        subjects.all_clusters(BackupRequested),
        ack_wait=60.0,
        max_deliver=3,
        backoff=(0.1,),
    )
    main.behaviour = behaviour
    try:
        for kind in ("ok", "retryable", "crash", "permanent", "always"):
            await bus.publish_event(request(kind))
        await bus.publish("klio.main.backup.requested", b"not json", "malformed")
        await bus.publish_event(request("foreign", cluster="other"))
        await bus.publish("klio.main.backup.requested", codec.encode(request("x", "other")), "x")

        await wait_until_async(lambda: len(letters.seen) >= 4, 30, "four dead letters")
        reasons = []
        for letter, _ in letters.seen:
            assert isinstance(letter, DeadLetter)
            assert letter.service == "test"
            assert letter.cluster == "main"
            assert letter.subject == "klio.main.backup.requested"
            reasons.append(letter.reason)
        assert len(reasons) == 4
        assert any("never works" in r for r in reasons)
        assert any("gave up after 3 deliveries: still not there" in r for r in reasons)
        assert any("malformed event" in r for r in reasons)
        assert any("of cluster 'other' arrived on" in r for r in reasons)
        assert "not json" in {
            letter.payload for letter, _ in letters.seen if isinstance(letter, DeadLetter)
        }

        info = await bus.jetstream.consumer_info(subjects.STREAM, "test--backup-requested")
        assert info.num_ack_pending == 0
        assert info.num_pending == 0
        counts: dict[str, list[int]] = {}
        for event, delivered in main.seen:
            assert isinstance(event, BackupRequested)
            counts.setdefault(event.request_id, []).append(delivered)
        assert counts["ok"] == [1]
        assert counts["retryable"] == [1, 2]
        assert counts["crash"] == [1, 2]
        assert counts["permanent"] == [1]
        assert counts["always"] == [1, 2, 3]
        assert "malformed" not in counts
        # the cluster "other" event on its own subject was delivered and acked normally
        assert counts["foreign"] == [1]
        assert "x" not in counts
        crashes = [r for r in caplog.records if r.exc_info and "a bug" in str(r.exc_info[1])]
        assert len(crashes) == 1
    finally:
        await main.close()
        await letters.close()


async def test_consume_survives_a_nats_restart(nats_server: NatsServer, bus: Bus) -> None:
    consumer = Consumer(bus, "test--backup-requested", subjects.all_clusters(BackupRequested))
    try:
        await bus.publish_event(request("before"))
        await wait_until_async(lambda: consumer.ids() == ["req-before"], 30, "the first event")
        nats_server.stop()
        await wait_until_async(lambda: not bus.is_connected, 30, "the bus to see the outage")
        nats_server.start()
        await wait_until_async(lambda: bus.is_connected, 30, "the bus to reconnect")
        await wait_until_async(
            lambda: _publish_quietly(bus, request("after")), 30, "a publish after the restart"
        )
        await wait_until_async(
            lambda: consumer.ids() == ["req-before", "req-after"], 30, "the second event"
        )
        assert not consumer.task.done()
    finally:
        await consumer.close()


async def _publish_quietly(bus: Bus, event: Event) -> bool:
    with contextlib.suppress(Retryable):
        await bus.publish_event(event)
        return True
    return False


async def test_consume_stops_promptly_and_cleanly(bus: Bus) -> None:
    consumer = Consumer(bus, "test--backup-requested", subjects.all_clusters(BackupRequested))
    await bus.publish_event(request("one"))
    await wait_until_async(lambda: consumer.ids() == ["req-one"], 30, "the event")
    await consumer.close()
    assert consumer.task.exception() is None


async def test_ready_check_follows_the_connection(nats_server: NatsServer, bus: Bus) -> None:
    assert bus.ready() == (True, "connected")
    nats_server.stop()
    await wait_until_async(lambda: not bus.ready()[0], 30, "the check to fail")
    assert bus.ready()[1] == f"not connected to NATS at {nats_server.url}"
    nats_server.start()
    await wait_until_async(lambda: bus.ready()[0], 30, "the check to pass again")
