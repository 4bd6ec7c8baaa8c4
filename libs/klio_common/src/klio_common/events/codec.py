"""JSON encoding of events: a lenient decoder for services, a strict one for tests, event ids."""

from __future__ import annotations

import functools
import hashlib
import uuid
from typing import Any, TypeVar, overload

import msgspec

from klio_common.errors import Permanent
from klio_common.events import ALL_EVENTS, AnyEvent
from klio_common.events.base import Event, tag_of

E = TypeVar("E", bound=Event)

_encoder = msgspec.json.Encoder()
_HINT = "check that every Klio service and the klio command run the same release (docs/events.md)"


def encode(event: Event) -> bytes:
    """The JSON bytes of an event (the NATS message payload)."""
    return _encoder.encode(event)


@functools.cache
def _decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type_)


def _decode(data: bytes | bytearray | memoryview, type_: Any, where: str) -> Any:
    try:
        return _decoder(type_).decode(data)
    except msgspec.DecodeError as exc:
        raise Permanent(f"malformed event{where}: {exc}", hint=_HINT) from exc


@overload
def decode(data: bytes | bytearray | memoryview, *, subject: str | None = None) -> Event: ...


@overload
def decode(
    data: bytes | bytearray | memoryview, type_: type[E], *, subject: str | None = None
) -> E: ...


def decode(
    data: bytes | bytearray | memoryview, type_: Any = AnyEvent, *, subject: str | None = None
) -> Any:
    """Decode an event, ignoring fields this release does not know (rolling upgrades).

    Args:
        data: the JSON payload.
        type_: one event class, or the default ``AnyEvent`` (chosen by the ``type`` field).
        subject: the subject it arrived on, named in the error.

    Returns:
        The event.

    Raises:
        Permanent: the payload is not valid JSON, not a known event, or breaks the schema.
    """
    return _decode(data, type_, f" on {subject}" if subject else "")


@functools.cache
def strict_type(cls: type[Event]) -> type[msgspec.Struct]:
    """A mirror of ``cls`` that refuses unknown fields (``forbid_unknown_fields`` is per class)."""
    config = cls.__struct_config__
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for field in msgspec.structs.fields(cls):
        if field.default is msgspec.NODEFAULT:
            fields.append((field.name, field.type))
        else:
            fields.append((field.name, field.type, field.default))
    return msgspec.defstruct(
        f"Strict{cls.__name__}",
        fields,
        kw_only=True,
        frozen=True,
        tag=config.tag,
        tag_field=config.tag_field,
        forbid_unknown_fields=True,
    )


@functools.cache
def _strict_union(types: tuple[type[Event], ...]) -> Any:
    mirrors = tuple(strict_type(t) for t in types)
    union: Any = mirrors[0]
    for mirror in mirrors[1:]:
        union = union | mirror
    return union


@overload
def decode_strict(data: bytes | bytearray | memoryview) -> Event: ...


@overload
def decode_strict(data: bytes | bytearray | memoryview, type_: type[E]) -> E: ...


def decode_strict(data: bytes | bytearray | memoryview, type_: Any = None) -> Any:
    """Decode an event, refusing unknown fields: for tests, which must see schema drift.

    Args:
        data: the JSON payload.
        type_: one event class, or None for any event.

    Returns:
        The event (the real class, not the strict mirror).

    Raises:
        Permanent: as ``decode``, and also for any field the schema does not define.
    """
    mirror = _strict_union(ALL_EVENTS) if type_ is None else strict_type(type_)
    _decode(data, mirror, " (strict)")
    return _decode(data, AnyEvent if type_ is None else type_, "")


def validate(event: Event) -> None:
    """Check an event against its schema, as a consumer will decode it.

    Building a Struct does not check patterns or bounds, so a publisher bug (an empty
    ``system_id``, a lower-case segment name) would only show up at the consumer, as a dead
    letter. Tests and careful publishers call this first.

    Raises:
        Permanent: the event breaks its schema.
    """
    _decode(encode(event), strict_type(type(event)), f" {tag_of(event)} (invalid to publish)")


def event_id_for(*parts: str) -> str:
    """A deterministic event id: the first 32 hex digits of a SHA-256 over ``parts``.

    Publishing the same fact twice gives the same id, so JetStream drops the duplicate
    (``Nats-Msg-Id``). Include the event type and what makes the fact unique, e.g.
    ``event_id_for("wal.segment.closed", cluster, segment, sha256)``.

    Raises:
        ValueError: no parts.
    """
    if not parts:
        raise ValueError("an event id needs at least one part")
    # JSON of the list keeps ("a.b", "c") and ("a", "b.c") apart, which a plain join would not.
    return hashlib.sha256(msgspec.json.encode(list(parts))).hexdigest()[:32]


def new_event_id() -> str:
    """A random event id, for facts that have no natural identity (a user's request)."""
    return uuid.uuid4().hex
