"""The one place settling JetStream messages: ack, nak with a delay, or term plus a dead letter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import nats.errors
from nats.aio.msg import Msg

from klio_common.errors import KlioError, Permanent, Retryable
from klio_common.events import DeadLetter, Event, codec, now, subjects
from klio_common.events.base import SYSTEM_ID_UNKNOWN
from klio_common.runtime import metrics

log = logging.getLogger("klio_common.runtime.bus")

NATS_ERRORS = (nats.errors.Error, asyncio.TimeoutError, OSError)

Handler = Callable[[Event, Msg], Awaitable[None]]
"""Handles one event; returning means done (ack), raising says how to settle the message."""

_outcomes = metrics.counter(
    "klio_bus_messages", "Messages consumed, by durable and outcome", ("durable", "outcome")
)


class Publisher(Protocol):
    """What settling needs of the bus: its name and a way to publish a dead letter."""

    name: str

    async def publish_event(self, event: Event) -> bool: ...


def describe(exc: BaseException) -> str:
    """A NATS error as one short line."""
    text = str(exc).removeprefix("nats: ")
    return text or type(exc).__name__


class Settler:
    """Runs the handler and settles the message: ack, nak with delay, or term + dead letter."""

    def __init__(
        self,
        bus: Publisher,
        durable: str,
        max_deliver: int,
        ack_wait: float,
        backoff: tuple[float, ...],
    ) -> None:
        self._bus = bus
        self._durable = durable
        self._max_deliver = max_deliver
        self._ack_wait = ack_wait
        self._backoff = backoff

    async def __call__(self, msg: Msg, handler: Handler) -> None:
        delivered = msg.metadata.num_delivered
        try:
            event = codec.decode(msg.data, subject=msg.subject)
            if subjects.cluster_of(msg.subject) != event.cluster:
                raise Permanent(f"event of cluster '{event.cluster}' arrived on {msg.subject}")
        except (Permanent, ValueError) as exc:
            await self._dead_letter(msg, exc, None)
            return
        keepalive = asyncio.create_task(self._keep_alive(msg))
        try:
            await handler(event, msg)
        except Permanent as exc:
            await self._dead_letter(msg, exc, event)
            return
        except Exception as exc:
            if delivered >= self._max_deliver:
                reason = f"gave up after {delivered} deliveries: {exc}"
                await self._dead_letter(msg, Permanent(reason), event)
                return
            delay = self._backoff[min(delivered, len(self._backoff)) - 1]
            if isinstance(exc, Retryable):
                log.warning(
                    "%s will retry in %ss: %s",
                    msg.subject,
                    delay,
                    exc.message,
                    extra={"durable": self._durable, "delivery": delivered, "hint": exc.hint},
                )
            else:
                log.error(
                    "handler of %s failed, will retry in %ss",
                    msg.subject,
                    delay,
                    exc_info=exc,
                    extra={"durable": self._durable, "delivery": delivered},
                )
            await self._settle(msg, "retried", msg.nak(delay=delay))
            return
        finally:
            keepalive.cancel()
        await self._settle(msg, "acked", msg.ack())

    async def release(self, msg: Msg) -> None:
        """Hand an unprocessed message back at once (we are stopping)."""
        await self._settle(msg, "released", msg.nak())

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self._ack_wait / 3)
            with contextlib.suppress(*NATS_ERRORS):
                await msg.in_progress()

    async def _settle(self, msg: Msg, outcome: str, action: Awaitable[None]) -> None:
        try:
            await action
        except nats.errors.MsgAlreadyAckdError:
            pass  # the handler settled it itself
        except NATS_ERRORS as exc:
            # Unsettled means redelivered after ack_wait: handlers are idempotent.
            log.debug("cannot settle %s: %s", msg.subject, describe(exc))
        _outcomes.labels(self._durable, outcome).inc()

    async def _dead_letter(self, msg: Msg, exc: BaseException, event: Event | None) -> None:
        reason = exc.message if isinstance(exc, KlioError) else str(exc)
        seq = msg.metadata.sequence.stream
        log.error(
            "giving up on %s (stream sequence %s): %s",
            msg.subject,
            seq,
            reason,
            extra={"durable": self._durable},
        )
        try:
            cluster = subjects.cluster_of(msg.subject)
        except ValueError:
            await self._settle(msg, "terminated", msg.term())
            return
        letter = DeadLetter(
            event_id=codec.event_id_for("deadletter", self._bus.name, msg.subject, str(seq)),
            occurred_at=now(),
            cluster=cluster,
            system_id=event.system_id if event is not None else SYSTEM_ID_UNKNOWN,
            service=self._bus.name,
            subject=msg.subject,
            reason=reason,
            payload=msg.data.decode("utf-8", errors="replace"),
        )
        try:
            await self._bus.publish_event(letter)
        except Retryable as publish_error:
            # Keep the message until its dead letter is stored: a report must not be lost.
            log.warning("cannot publish the dead letter: %s", publish_error.message)
            await self._settle(msg, "retried", msg.nak(delay=self._backoff[-1]))
            return
        await self._settle(msg, "dead-lettered", msg.term())
