"""NATS names: the stream, every subject and every durable consumer name, built by functions."""

from __future__ import annotations

import re

from klio_common.events.base import CLUSTER_PATTERN, Event, tag_of

PREFIX = "klio"
STREAM = "KLIO"
STREAM_SUBJECTS = [f"{PREFIX}.>"]
DEADLETTER = "deadletter"

_CLUSTER_RE = re.compile(CLUSTER_PATTERN)
_SERVICE_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_TAG_RE = re.compile(r"[a-z0-9]+(\.[a-z0-9]+)*")


def validate_cluster_name(name: str) -> str:
    """Check a cluster name: a DNS-1123 label, as Kubernetes names are.

    Args:
        name: the cluster's name.

    Returns:
        ``name`` unchanged.

    Raises:
        ValueError: not 1 to 63 lower-case letters, digits or '-', starting and ending alphanumeric.
    """
    if not isinstance(name, str) or not _CLUSTER_RE.fullmatch(name):
        raise ValueError(
            f"invalid cluster name {name!r}: expected a DNS-1123 label (1 to 63 lower-case "
            "letters, digits and '-', starting and ending with a letter or digit)"
        )
    return name


def _tag(event_or_type: Event | type[Event] | str) -> str:
    tag = tag_of(event_or_type)
    if not _TAG_RE.fullmatch(tag):
        raise ValueError(f"invalid event type {tag!r}: expected dot-separated lower-case words")
    return tag


def subject(cluster: str, event_or_type: Event | type[Event] | str) -> str:
    """The subject an event of ``cluster`` is published on: ``klio.<cluster>.<tag>``.

    Args:
        cluster: the cluster's name.
        event_or_type: an event, an event class, or a tag such as ``"wal.segment.closed"``.

    Raises:
        ValueError: an invalid cluster name or event type.
    """
    return f"{PREFIX}.{validate_cluster_name(cluster)}.{_tag(event_or_type)}"


def subject_of(event: Event) -> str:
    """The subject ``event`` is published on (its own cluster and type)."""
    return subject(event.cluster, event)


def all_clusters(event_type: Event | type[Event] | str) -> str:
    """A filter matching one event type of every cluster: ``klio.*.<tag>``."""
    return f"{PREFIX}.*.{_tag(event_type)}"


def cluster_subjects(cluster: str) -> str:
    """A filter matching every event of one cluster: ``klio.<cluster>.>``."""
    return f"{PREFIX}.{validate_cluster_name(cluster)}.>"


def _split(subject_: str) -> tuple[str, str]:
    parts = subject_.split(".", 2)
    if len(parts) < 3 or parts[0] != PREFIX or not _CLUSTER_RE.fullmatch(parts[1]) or not parts[2]:
        raise ValueError(f"not a Klio subject {subject_!r}: expected klio.<cluster>.<event>")
    return parts[1], parts[2]


def cluster_of(subject_: str) -> str:
    """The cluster named in a subject.

    Raises:
        ValueError: not of the form ``klio.<cluster>.<event>``.
    """
    return _split(subject_)[0]


def event_type_of(subject_: str) -> str:
    """The event type (tag) named in a subject, e.g. ``wal.segment.closed``.

    Raises:
        ValueError: not of the form ``klio.<cluster>.<event>``.
    """
    return _split(subject_)[1]


def durable(service: str, event_type: Event | type[Event] | str) -> str:
    """The durable consumer name of ``service`` for one event type.

    NATS forbids dots in consumer names, so ``durable("relay", "wal.segment.closed")`` is
    ``"relay--wal-segment-closed"``.

    Raises:
        ValueError: an invalid service name or event type.
    """
    if not _SERVICE_RE.fullmatch(service):
        raise ValueError(f"invalid service name {service!r}: expected lower-case words and '-'")
    return f"{service}--{_tag(event_type).replace('.', '-')}"
