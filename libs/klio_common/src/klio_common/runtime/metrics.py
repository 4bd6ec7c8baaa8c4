"""Prometheus metrics: one registry per process and get-or-create helpers for its collectors."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""The ``Content-Type`` of `exposition`."""

_C = TypeVar("_C", Counter, Gauge, Histogram)

_lock = threading.Lock()
_registry: CollectorRegistry | None = None
_collectors: dict[str, Any] = {}


def registry() -> CollectorRegistry:
    """Return this process's registry (created on first use, with the process collector)."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = CollectorRegistry(auto_describe=True)
            ProcessCollector(registry=_registry)
        return _registry


def _get_or_create(kind: type[_C], name: str, doc: str, labels: Sequence[str], **extra: Any) -> _C:
    reg = registry()
    with _lock:
        existing = _collectors.get(name)
        if existing is not None:
            if not isinstance(existing, kind) or tuple(existing._labelnames) != tuple(labels):
                raise ValueError(f"metric {name} already exists with another type or labels")
            return existing
        collector = kind(name, doc, labelnames=tuple(labels), registry=reg, **extra)
        _collectors[name] = collector
        return collector


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    """Return the counter ``name``, creating it on first call.

    Args:
        name: metric name, ``klio_`` prefixed, without the ``_total`` suffix.
        doc: one-line help text.
        labels: label names; the same on every call.

    Raises:
        ValueError: ``name`` exists with another type or other labels.
    """
    return _get_or_create(Counter, name, doc, labels)


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    """Return the gauge ``name``, creating it on first call (see `counter`)."""
    return _get_or_create(Gauge, name, doc, labels)


def histogram(
    name: str,
    doc: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = Histogram.DEFAULT_BUCKETS,
) -> Histogram:
    """Return the histogram ``name``, creating it on first call (see `counter`).

    Args:
        name: metric name, with its unit as suffix (``_seconds``, ``_bytes``).
        doc: one-line help text.
        labels: label names.
        buckets: upper bounds; only used when the histogram is created.
    """
    return _get_or_create(Histogram, name, doc, labels, buckets=tuple(buckets))


def exposition() -> bytes:
    """Return every metric of the registry in the Prometheus text format."""
    data: bytes = generate_latest(registry())
    return data
