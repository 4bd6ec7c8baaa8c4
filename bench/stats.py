"""Benchmark arithmetic and Markdown helpers shared by the report modules."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

MB = 1_000_000


def median(values: Sequence[float]) -> float:
    """Return the median of ``values``.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def mean(values: Sequence[float]) -> float:
    """Return the arithmetic mean of ``values``.

    Raises:
        ValueError: ``values`` is empty.
    """
    if not values:
        raise ValueError("mean of no values")
    return float(statistics.fmean(values))


def ratio(value: float, baseline: float) -> float:
    """Return ``value / baseline``.

    Raises:
        ValueError: the baseline is not positive (the figure would be meaningless).
    """
    if baseline <= 0:
        raise ValueError(f"ratio against a baseline of {baseline}")
    return value / baseline


def column(samples: Sequence[Mapping[str, float]], key: str) -> list[float]:
    """The ``key`` of every sample."""
    return [float(s[key]) for s in samples]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def runs_text(raw: Mapping[str, Any]) -> str:
    """``3 runs`` (or ``1 run``): the samples of the first variant in ``raw``."""
    count = len(next(iter(raw["samples"].values())))
    return f"{count} run" if count == 1 else f"{count} runs"


def times(value: float) -> str:
    """A ratio as ``1.23×``."""
    return f"{value:.2f}×"
