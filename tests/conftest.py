"""Pytest configuration: fixture plugins and markers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The plugins are imported as ``tests.fixtures.*``; `.venv/bin/pytest`, unlike
# `python -m pytest`, does not put the repository root on sys.path.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest_plugins = (
    "tests.fixtures.hygiene",
    "tests.fixtures.paths",
    "tests.fixtures.postgres",
    "tests.fixtures.nats",
    "tests.fixtures.s3",
)


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers (``--strict-markers`` rejects unknown ones)."""
    config.addinivalue_line("markers", "integration: needs real PostgreSQL, NATS or S3 servers")
    config.addinivalue_line("markers", "e2e: runs the real klio processes")
