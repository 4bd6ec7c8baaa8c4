"""The event envelope every Klio event shares, and the field types events are built from."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec

# Field types shared by the event modules. Patterns are part of the published schema, so a
# consumer in another language can validate with the same rules.
UtcTime = Annotated[datetime, msgspec.Meta(tz=True, description="time with zone, UTC")]
LsnText = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$",
        description="an LSN as PostgreSQL prints it",
        examples=["16/B374D848"],
    ),
]
SegmentName = Annotated[
    str,
    msgspec.Meta(pattern=r"^[0-9A-F]{24}$", examples=["000000010000000000000003"]),
]
HistoryName = Annotated[
    str, msgspec.Meta(pattern=r"^[0-9A-F]{8}\.history$", examples=["00000002.history"])
]
WalFileName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^([0-9A-F]{24}(\.partial)?|[0-9A-F]{8}\.history)$",
        description="a WAL segment, partial segment or timeline history file name",
    ),
]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$", description="lower-case hex")]
Timeline = Annotated[int, msgspec.Meta(ge=1, le=0xFFFFFFFF, description="a timeline id")]
ByteCount = Annotated[int, msgspec.Meta(ge=0, description="bytes")]
Count = Annotated[int, msgspec.Meta(ge=0)]
Tier = Annotated[int, msgspec.Meta(ge=1, le=2, description="1 = the volume, 2 = the bucket")]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

CLUSTER_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
SYSTEM_ID_UNKNOWN = "0"


def now() -> datetime:
    """The current time in UTC, for ``occurred_at``."""
    return datetime.now(UTC)


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every event: the envelope fields.

    Concrete events set ``tag`` to their subject suffix (``klio.<cluster>.<tag>``); the tag is
    written in the ``type`` field.
    """

    schema: Annotated[int, msgspec.Meta(ge=1, description="version of this event's schema")] = 1
    event_id: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=128,
            description="deterministic id; also the Nats-Msg-Id header, so retries deduplicate",
        ),
    ]
    occurred_at: Annotated[UtcTime, msgspec.Meta(description="when it happened (UTC)")]
    cluster: Annotated[
        str,
        msgspec.Meta(
            pattern=CLUSTER_PATTERN,
            description="the Kubernetes name of the PostgreSQL cluster",
        ),
    ]
    system_id: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^[0-9]{1,20}$",
            description=(
                "PostgreSQL system identifier as a decimal string (a uint64 loses precision as "
                "a JSON number); '0' when unknown"
            ),
        ),
    ]


def tag_of(event_or_type: Event | type[Event] | str) -> str:
    """The tag (subject suffix) of an event, an event class, or a tag given as text.

    Raises:
        ValueError: an event class without a tag.
    """
    if isinstance(event_or_type, str):
        return event_or_type
    cls = event_or_type if isinstance(event_or_type, type) else type(event_or_type)
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str) or tag == cls.__name__:
        raise ValueError(f"{cls.__name__} is not a concrete event type")
    return tag


class DeadLetter(Event, frozen=True, tag="deadletter"):
    """A message a service could never handle, terminated instead of redelivered forever.

    Published by the runtime of the consuming service on ``klio.<cluster>.deadletter``.
    """

    service: Annotated[str, msgspec.Meta(description="the service that gave up on the message")]
    subject: Annotated[str, msgspec.Meta(description="the subject the message arrived on")]
    reason: Annotated[str, msgspec.Meta(description="why it can never succeed (the error)")]
    payload: Annotated[
        str,
        msgspec.Meta(description="the message body as UTF-8 text (invalid bytes replaced)"),
    ]
