"""The JetStream bus: connection, the stream, publishing and consuming (settling: `settler`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from klio_common.errors import Permanent, Retryable
from klio_common.events import Event, codec, subjects
from klio_common.runtime.settings import NatsSettings
from klio_common.runtime.settler import NATS_ERRORS as _NATS_ERRORS
from klio_common.runtime.settler import Handler, Settler
from klio_common.runtime.settler import describe as _describe

log = logging.getLogger(__name__)
__all__ = ["DUPLICATE_WINDOW", "MAX_AGE", "Bus", "Handler"]


DUPLICATE_WINDOW = 120.0
MAX_AGE = 14 * 24 * 3600.0
_FETCH_TIMEOUT = 2.0  # also how quickly a consumer notices the stop event
_RETRY_PAUSE = 1.0
_CONNECT_HINT = "check that nats-server is running with JetStream (-js) and reachable at nats.url"


def _tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    wanted = settings.url.startswith(("tls://", "wss://")) or settings.tls_ca or settings.tls_cert
    if not wanted:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.tls_ca) if settings.tls_ca is not None else None
    )
    if settings.tls_cert is not None and settings.tls_key is not None:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


class Bus:
    """A connection to NATS and its JetStream context. Build it with `Bus.connect`."""

    def __init__(self, client: Client, *, name: str, url: str) -> None:
        self._nc = client
        self._js: JetStreamContext = client.jetstream()
        self.name = name
        self.url = url

    @classmethod
    async def connect(cls, settings: NatsSettings, *, name: str, reconnect: bool = True) -> Bus:
        """Connect to NATS.

        Args:
            settings: URL, TLS and credentials.
            name: the service name; names the connection and signs dead letters.
            reconnect: once connected, reconnect forever after an outage (services); False
                gives up at the first disconnect (command-line tools).

        Returns:
            The connected bus.

        Raises:
            Retryable: NATS cannot be reached now (the initial connection is tried twice).
            Permanent: TLS files or credentials are unusable.
        """
        client = Client()
        failures: list[BaseException] = []
        connected = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            if not connected.is_set():
                failures.append(exc)
            else:
                log.debug("nats client error: %s", _describe(exc))

        async def on_disconnected() -> None:
            if connected.is_set():
                log.warning("disconnected from NATS at %s", settings.url)

        async def on_reconnected() -> None:
            log.info("reconnected to NATS at %s", settings.url)

        try:
            tls = _tls_context(settings)
        except (OSError, ssl.SSLError) as exc:
            raise Permanent(
                f"cannot load the NATS TLS files: {exc}",
                hint="check nats.tls_ca, nats.tls_cert and nats.tls_key",
            ) from exc
        options: dict[str, Any] = {}
        if tls is not None:
            options["tls"] = tls
        if settings.creds_file is not None:
            options["user_credentials"] = str(settings.creds_file)
        try:
            await client.connect(
                servers=[settings.url],
                name=name if name.startswith("klio") else f"klio-{name}",
                connect_timeout=math.ceil(settings.connect_timeout),
                allow_reconnect=reconnect,
                # Bounded while connecting, so a missing server is reported; forever afterwards.
                max_reconnect_attempts=1,
                reconnect_time_wait=1,
                drain_timeout=5,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                **options,
            )
        except (*_NATS_ERRORS, ImportError) as exc:
            reason = _describe(failures[-1] if failures else exc)
            raise Retryable(
                f"cannot connect to NATS at {settings.url}: {reason}", hint=_CONNECT_HINT
            ) from exc
        if reconnect:
            client.options["max_reconnect_attempts"] = -1
        connected.set()
        return cls(client, name=name, url=settings.url)

    @property
    def is_connected(self) -> bool:
        """True while the connection to NATS is up."""
        return bool(self._nc.is_connected)

    @property
    def jetstream(self) -> JetStreamContext:
        """The nats-py JetStream context, for what this class does not wrap."""
        return self._js

    def ready(self) -> tuple[bool, str]:
        """A readiness check for `Health.add_check`: connected to NATS or not."""
        if self.is_connected:
            return True, "connected"
        return False, f"not connected to NATS at {self.url}"

    async def close(self) -> None:
        """Drain subscriptions and pending publishes, then close; never raises."""
        if self._nc.is_closed:
            return
        try:
            await asyncio.wait_for(self._nc.drain(), 10)
        except (*_NATS_ERRORS, asyncio.CancelledError) as exc:
            log.debug("closing the NATS connection: %s", _describe(exc))
            with contextlib.suppress(*_NATS_ERRORS):
                await self._nc.close()

    async def ensure_stream(self) -> None:
        """Create the stream, or update it when its settings differ; idempotent.

        File storage, subjects ``klio.>``, a 2-minute duplicate window, 14 days of history.

        Raises:
            Retryable: JetStream is unreachable or not enabled.
            Permanent: the stream exists with memory storage (storage cannot be changed).
        """
        wanted: dict[str, Any] = {
            "subjects": list(subjects.STREAM_SUBJECTS),
            "duplicate_window": DUPLICATE_WINDOW,
            "max_age": MAX_AGE,
        }
        jsm = self._js._jsm
        try:
            try:
                info = await jsm.stream_info(subjects.STREAM)
            except nats.js.errors.NotFoundError:
                config = api.StreamConfig(
                    name=subjects.STREAM, storage=api.StorageType.FILE, **wanted
                )
                try:
                    await jsm.add_stream(config)
                    log.info("created JetStream stream %s", subjects.STREAM)
                    return
                except nats.js.errors.BadRequestError:
                    info = await jsm.stream_info(subjects.STREAM)  # another service was faster
            current = info.config
            if current.storage != api.StorageType.FILE:
                raise Permanent(
                    f"JetStream stream {subjects.STREAM} uses {current.storage} storage, "
                    "Klio needs file storage",
                    hint=f"remove it (nats stream rm {subjects.STREAM}) and restart the services",
                )
            if any(getattr(current, key) != value for key, value in wanted.items()):
                await jsm.update_stream(current.evolve(**wanted))
                log.info("updated JetStream stream %s", subjects.STREAM)
        except _NATS_ERRORS as exc:
            raise Retryable(
                f"cannot set up JetStream stream {subjects.STREAM}: {_describe(exc)}",
                hint=_CONNECT_HINT,
            ) from exc

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> bool:
        """Publish to the stream and wait for JetStream to store it.

        Args:
            subject: ``klio.<cluster>.<event>``.
            payload: the message body.
            msg_id: ``Nats-Msg-Id``; JetStream drops a repeat within the duplicate window.

        Returns:
            True when JetStream already had ``msg_id`` (a duplicate, not stored again).

        Raises:
            Retryable: NATS is unreachable or did not acknowledge the publish.
        """
        try:
            ack = await self._js.publish(
                subject, payload, stream=subjects.STREAM, headers={"Nats-Msg-Id": msg_id}
            )
        except _NATS_ERRORS as exc:
            raise Retryable(
                f"cannot publish to {subject}: {_describe(exc)}", hint=_CONNECT_HINT
            ) from exc
        return bool(ack.duplicate)

    async def publish_event(self, event: Event) -> bool:
        """Publish ``event`` on its subject, ``event_id`` as ``Nats-Msg-Id`` (see `publish`)."""
        return await self.publish(subjects.subject_of(event), codec.encode(event), event.event_id)

    async def _provision(
        self, durable: str, filter_subject: str, max_deliver: int, ack_wait: float
    ) -> None:
        config = api.ConsumerConfig(
            durable_name=durable,
            name=durable,
            filter_subject=filter_subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            max_deliver=max_deliver,
            ack_wait=ack_wait,
        )
        try:
            await self._js._jsm.add_consumer(subjects.STREAM, config)
        except nats.js.errors.BadRequestError as exc:
            # An existing durable whose settings cannot change in place keeps working as it is.
            await self._js._jsm.consumer_info(subjects.STREAM, durable)
            log.warning("consumer %s kept its old settings: %s", durable, _describe(exc))

    async def consume(
        self,
        *,
        durable: str,
        filter_subject: str,
        handler: Handler,
        stop: asyncio.Event,
        batch: int = 10,
        max_deliver: int = 20,
        ack_wait: float = 60.0,
        backoff: Sequence[float] = (1, 5, 30),
    ) -> None:
        """Feed the events of a durable pull consumer to ``handler`` until ``stop`` is set.

        Outcomes: ``handler`` returns → ack; raises `Retryable` → nak, redelivered after
        ``backoff[delivery - 1]`` seconds (the last value repeats); raises `Permanent`, or the
        payload is not an event of the subject's cluster → term and a `DeadLetter` on
        ``klio.<cluster>.deadletter``; any other exception → logged with its traceback and
        nak'ed like `Retryable`. The last allowed delivery that fails is dead-lettered too.
        NATS outages are waited out (nats-py reconnects).

        Args:
            durable: the consumer name (see ``subjects.durable``).
            filter_subject: which subjects it receives (one filter, for nats-server 2.9).
            handler: called as ``handler(event, msg)``; must be idempotent.
            stop: set to return after the message in hand is settled.
            batch: messages fetched at once.
            max_deliver: deliveries before the message is given up.
            ack_wait: seconds without an ack before JetStream redelivers; kept alive while the
                handler runs.
            backoff: nak delays by delivery count.

        Raises:
            Retryable: the consumer cannot be created, or the connection was closed for good.
        """
        try:
            await self._provision(durable, filter_subject, max_deliver, ack_wait)
            sub = await self._js.pull_subscribe_bind(durable=durable, stream=subjects.STREAM)
        except _NATS_ERRORS as exc:
            raise Retryable(
                f"cannot create the JetStream consumer {durable}: {_describe(exc)}",
                hint=_CONNECT_HINT,
            ) from exc
        settle = Settler(self, durable, max_deliver, ack_wait, tuple(backoff) or (1.0,))
        failing: str | None = None
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(batch, timeout=_FETCH_TIMEOUT)
                except nats.errors.TimeoutError:
                    continue  # nothing to do, or NATS is away: both are normal
                except _NATS_ERRORS as exc:
                    if self._nc.is_closed:
                        raise Retryable(f"connection to NATS at {self.url} closed") from exc
                    if failing != _describe(exc):
                        failing = _describe(exc)
                        log.warning("consumer %s cannot fetch: %s", durable, failing)
                    await _pause(stop, _RETRY_PAUSE)
                    with contextlib.suppress(*_NATS_ERRORS):
                        await self._provision(durable, filter_subject, max_deliver, ack_wait)
                    continue
                failing = None
                for msg in msgs:
                    if stop.is_set():
                        await settle.release(msg)
                    else:
                        await settle(msg, handler)
        finally:
            with contextlib.suppress(*_NATS_ERRORS):
                await sub.unsubscribe()


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
