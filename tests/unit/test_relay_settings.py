"""The ``relay:`` settings group: defaults, overrides and checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from klio_common.errors import ConfigError
from klio_common.runtime.settings import Settings


def test_relay_settings_have_defaults() -> None:
    relay = Settings.load(None, {}).relay
    assert (relay.concurrency, relay.reconcile_interval, relay.multipart_threshold) == (
        4,
        60.0,
        64 * 1024 * 1024,
    )


def test_relay_settings_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "klio.yaml"
    path.write_text("relay: {concurrency: 8, multipart_threshold: 8388608}\n")
    relay = Settings.load(path, {"KLIO_RELAY__RECONCILE_INTERVAL": "5.5"}).relay
    assert (relay.concurrency, relay.reconcile_interval, relay.multipart_threshold) == (
        8,
        5.5,
        8 << 20,
    )


def test_relay_settings_are_checked_all_at_once(tmp_path: Path) -> None:
    path = tmp_path / "klio.yaml"
    path.write_text("relay: {concurrency: 0, reconcile_interval: 0, multipart_threshold: 1024}\n")
    with pytest.raises(ConfigError) as caught:
        Settings.load(path, {})
    found = caught.value.problems
    for key in ("concurrency", "reconcile_interval", "multipart_threshold"):
        assert any(p.startswith(f"relay.{key}:") for p in found), found
    path.write_text("relay: {concurency: 2}\n")
    with pytest.raises(ConfigError, match="did you mean 'concurrency'"):
        Settings.load(path, {})
