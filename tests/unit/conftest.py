"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from klio_common.crypto import KeyRing
from tests.unit.test_objects import ring


@pytest.fixture
def k1(tmp_path: Path) -> KeyRing:
    """A keyring with one random key, ``k1``."""
    return ring(tmp_path)
