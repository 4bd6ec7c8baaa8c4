"""A full Tier-1 volume: retention, the way to free it, must still run on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from klio_dev import PostgresServer
from tests.basebackup.helpers import basebackup_inprocess, catalog_of, events, store_of
from tests.fixtures.paths import KlioConfigWriter, Volume, fill
from tests.restore.helpers import backup_now, wait_ready
from tests.retention.helpers import keep_one_backup, retention, tier1_bytes
from tests.wal_receiver.helpers import receiver_inprocess, wait_closed

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
    ids = []
    with receiver_inprocess(settings), basebackup_inprocess(settings):
        wait_ready(settings, "basebackup")
        for round_ in range(3):
            pg.execute("UPDATE t SET v = md5(v || %s)", (str(round_),))
            ids.append(backup_now(config, settings).id)
        end = pg.current_lsn()
        pg.switch_wal()
        wait_closed(settings, end)
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
