"""What crashes leave on Tier 1: unfinished backup directories, orphan chunks, chunks set aside."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest

from klio_common import compression
from klio_common.catalog.chunks import ChunkStore
from tests.basebackup.helpers import catalog_of
from tests.fixtures.paths import KlioConfigWriter
from tests.retention.helpers import retention, synthetic_cluster
from tests.wal_receiver.helpers import keyring_of, load

pytestmark = pytest.mark.integration


def test_leftovers_go_and_a_chunk_set_aside_comes_back(
    tier1_dir: Path, keyring_files: dict[str, Path], klio_config: KlioConfigWriter
) -> None:
    cluster = {"name": "main", "conninfo": "host=/x", "retention": {"tier1": "REDUNDANCY 2"}}
    config = klio_config(
        tier1=tier1_dir,
        keys=keyring_files,
        extra={"clusters": [cluster], "retention": {"chunk_grace": 0}},
    )
    settings = load(config)
    _, b2 = synthetic_cluster(settings, [2, 4])
    catalog = catalog_of(settings)
    store = ChunkStore(tier1_dir / "main", keyring_of(settings), compression.get("zstd", 3))
    orphan_data = secrets.token_bytes(3000)
    orphan = store.chunk_id(orphan_data)
    store.put(orphan, orphan_data)
    crashed = catalog.backup_dir("20251231T000000Z")
    crashed.mkdir()
    (crashed / "progress.json").write_text("{}")
    # A run killed after renaming one of b2's chunks aside, before deciding about it.
    kept = catalog.load(b2).files[1].chunks[0]
    aside = store.path(kept).with_name(f".{kept}.tmp-retention")
    store.path(kept).rename(aside)

    [young] = retention(config, "plan", "--tier", "1")
    assert young["expire"] == [] and young["leftovers"] == []
    assert young["chunks"]["count"] == 0
    assert young["chunks_held"] == {
        "backup 20251231T000000Z is in progress (it may reference them)": 1
    }

    hour_ago = time.time() - 3600
    os.utime(crashed, (hour_ago, hour_ago))
    [done] = retention(config, "apply", "--tier", "1")
    assert done["leftovers_removed"] == ["20251231T000000Z"]
    assert done["chunks_deleted"] == 1
    assert not crashed.exists()
    assert not store.path(orphan).exists()
    assert store.path(kept).exists() and not aside.exists()
    assert store.get(kept)  # whole again, and still what its id says
