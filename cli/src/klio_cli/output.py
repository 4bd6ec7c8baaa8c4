"""Printing for the ``klio`` command: text for people, ``--json`` for scripts, errors to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any

from klio_common.errors import KlioError


def error(message: str, hint: str | None = None) -> None:
    """Print ``klio: error: <message>`` and an optional ``HINT:`` line to stderr."""
    print(f"klio: error: {message}", file=sys.stderr)
    if hint:
        print(f"HINT: {hint}", file=sys.stderr)


def klio_error(exc: KlioError) -> None:
    """Print a Klio error with its hint."""
    error(exc.message, exc.hint)


def os_error(exc: OSError) -> None:
    """Print an operating-system error naming the file, without a traceback."""
    where = f" {exc.filename}" if exc.filename else ""
    error(f"cannot access{where}: {exc.strerror or exc}")


def json_document(data: Any) -> None:
    """Print one JSON document (``--json``); values must already be JSON types."""
    print(json.dumps(data, indent=2, sort_keys=False))


def json_line(data: Any) -> None:
    """Print one JSON object on one line and flush (streams such as ``events tail --json``)."""
    print(json.dumps(data, separators=(",", ":")), flush=True)


def table(rows: Iterable[tuple[str, str]]) -> None:
    """Print ``label: value`` lines with the values aligned."""
    items = list(rows)
    width = max((len(label) for label, _ in items), default=0) + 1
    for label, value in items:
        print(f"{label + ':':<{width}} {value}")


def size(n: int) -> str:
    """A byte count for people: ``0 B``, ``512 B``, ``16.0 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 segment``, ``2 segments``."""
    return f"{n} {word if n == 1 else (words or word + 's')}"
