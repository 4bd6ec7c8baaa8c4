"""Bad input: each refusal is a clear error with a HINT, and nothing (more) is written."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.fixtures.paths import KlioConfigWriter, Volume
from tests.restore.conftest import Backed
from tests.restore.helpers import catalog_parts, flip_byte, klio, output_of


def assert_refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 1, output_of(done)
    assert "klio: error:" in done.stderr and "\nHINT: " in done.stderr, output_of(done)
    for word in words:
        assert word in done.stderr, output_of(done)


def test_refusals_write_nothing(backed_up: Backed) -> None:
    b = backed_up
    full = b.area / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_refused(klio(b.config, "restore", "--pgdata", str(full)), "is not empty", "keep.txt")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert (full / "keep.txt").read_text() == "mine"

    new = b.area / "new"
    before = (b.backup.start_time - timedelta(hours=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    refusals: list[tuple[list[str], str | None, tuple[str, ...]]] = [
        ([], "nope", ("nope",)),
        (["--target-time", before], None, ("before the end of", b.backup.id)),
        (["--target-time", future], None, ("past the end of the WAL archive",)),
        (["--target-lsn", "FF/0"], None, ("beyond the end of the WAL archive",)),
        (["--backup", "20000101T000000Z"], None, ("20000101T000000Z", "does not exist")),
        (["--tablespace-map", "/nowhere=/x"], None, ("not a tablespace location",)),
        (["--tablespace-map", "relative=/x"], None, ("invalid --tablespace-map",)),
        (["--target-xid", "x1"], None, ("invalid target xid",)),
    ]
    for args, cluster, words in refusals:
        done = klio(b.config, "restore", "--pgdata", str(new), *args, cluster=cluster)
        assert_refused(done, *words)
        assert not new.exists(), f"{args} left {new}"


def test_wrong_key_is_named(
    backed_up: Backed,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: KlioConfigWriter,
) -> None:
    wrong = keyring_files["k1"].with_name("k1-wrong")
    wrong.write_bytes(secrets.token_bytes(32))
    shutil.copymode(keyring_files["k1"], wrong)
    shutil.chown(wrong, group=keyring_files["k1"].group())
    config = klio_config(
        pg=backed_up.pg,
        nats=nats_server,
        tier1=tier1_dir,
        keys={"k1": wrong, "k2": keyring_files["k2"]},
        path=keyring_files["k1"].parent.parent / "wrong-key.yaml",
    )
    new = backed_up.area / "new"
    assert_refused(klio(config, "restore", "--pgdata", str(new)), "cannot decrypt", "'k1'")
    assert not new.exists()
    assert_refused(klio(config, "verify"), "cannot decrypt", "wrong key")


def test_flipped_byte_in_a_chunk_is_named_by_file(backed_up: Backed) -> None:
    b = backed_up
    good = klio(b.config, "verify")
    assert good.returncode == 0 and "result: ok" in good.stdout, output_of(good)

    relation = str(b.pg.sql("SELECT pg_relation_filepath('t')")[0][0])
    uses = Counter(c for f in b.backup.files for c in f.chunks)
    entry = next(f for f in b.backup.files if f.path == relation)
    chunk = next(c for c in reversed(entry.chunks) if uses[c] == 1)
    _, chunks = catalog_parts(b.settings)
    flip_byte(chunks.path(chunk))

    bad = klio(b.config, "verify")
    assert bad.returncode == 1, output_of(bad)
    assert f"{relation}: chunk {chunk}" in bad.stdout and "result: FAIL" in bad.stdout
    doc = json.loads(klio(b.config, "verify", "--json").stdout)
    assert [p["file"] for p in doc["problems"]] == [relation], doc
    assert doc["ok"] is False

    new = b.area / "new" / "pgdata"
    done = klio(b.config, "restore", "--pgdata", str(new), "--jobs", "2")
    assert_refused(done, f"file {relation}", chunk)
    assert not new.parent.exists(), "a failed restore must remove what it created"


def test_a_full_target_volume_is_named_and_emptied(
    backed_up: Backed, small_volume: Callable[..., Volume]
) -> None:
    volume = small_volume(8, "pgdata-volume")  # the backup's cluster needs about 40 MB
    shutil.chown(volume.path, "postgres", "postgres")
    volume.path.chmod(0o700)
    pgdata = volume.path / "pgdata"
    done = klio(backed_up.config, "restore", "--pgdata", str(pgdata))
    assert_refused(done, "no space left on device restoring backup", str(pgdata), "MiB of files")
    assert list(volume.path.iterdir()) == []  # what the restore created is gone
