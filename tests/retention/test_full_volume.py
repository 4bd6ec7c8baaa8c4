"""A full Tier-1 volume: retention, the way to free it, must still run on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from klio_dev import PostgresServer
from tests.basebackup.helpers import catalog_of, events, store_of
from tests.fixtures.paths import KlioConfigWriter, Volume, fill
from tests.retention.helpers import keep_one_backup, retention, three_backups, tier1_bytes

pytestmark = pytest.mark.integration


def test_retention_frees_a_full_tier1(
    pg: PostgresServer,
    nats_server: Any,
    small_volume: Callable[..., Volume],
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    volume = small_volume(128)
    config, settings = keep_one_backup(klio_config, pg, nats_server, volume.path, keyring_files)
    ids = three_backups(pg, config, settings)
    fill(volume.path / "ballast")  # whatever filled it: the volume has no byte left
    before = tier1_bytes(settings)

    [applied] = retention(config, "apply", "--tier", "1")

    assert applied["expired"] == ids[:2], applied
    assert tier1_bytes(settings) < before
    assert catalog_of(settings).ids() == ids[2:]
    expired = events(nats_server.url, "klio.main.retention.backup.expired")
    assert sorted(e["backup_id"] for e in expired) == ids[:2]  # announced once there was room
    store = store_of(settings)
    for entry in catalog_of(settings).load(ids[2]).files:
        for chunk in entry.chunks:
            assert store.path(chunk).exists(), (entry.path, chunk)
