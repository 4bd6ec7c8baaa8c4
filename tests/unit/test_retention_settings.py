"""The ``retention:`` settings group: defaults, overrides, and every bad value reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from klio_common.errors import ConfigError
from klio_common.runtime.settings import Settings


def test_defaults() -> None:
    settings = Settings.load(None, {})
    assert settings.retention.minimum_redundancy == 1
    assert settings.retention.interval == 3600.0
    assert settings.retention.chunk_grace == 300.0


def test_yaml_and_environment(tmp_path: Path) -> None:
    config = tmp_path / "klio.yaml"
    config.write_text("retention: {minimum_redundancy: 2, interval: 60}\n")
    settings = Settings.load(config, {"KLIO_RETENTION__CHUNK_GRACE": "0"})
    assert settings.retention.minimum_redundancy == 2
    assert settings.retention.interval == 60.0
    assert settings.retention.chunk_grace == 0.0


def test_every_bad_value_at_once(tmp_path: Path) -> None:
    config = tmp_path / "klio.yaml"
    config.write_text("retention: {minimum_redundancy: 0, interval: 0, chunk_grace: -1, keep: 3}\n")
    with pytest.raises(ConfigError) as caught:
        Settings.load(config, {})
    problems = caught.value.problems
    assert any(p.startswith("retention.minimum_redundancy:") for p in problems), problems
    assert any(p.startswith("retention.interval:") for p in problems), problems
    assert any(p.startswith("retention.chunk_grace:") for p in problems), problems
    assert any(p.startswith("retention.keep: unknown key") for p in problems), problems
