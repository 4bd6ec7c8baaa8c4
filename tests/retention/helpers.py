"""Retention tests: ``klio retention`` runs, backdated backups, what each tier holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec

from klio_common import fsio
from klio_common.objects import encode_object
from klio_common.runtime.settings import Settings
from klio_common.storage.layout import Kind, kind_of
from klio_dev import S3Server
from tests.basebackup.helpers import catalog_of
from tests.restore.helpers import klio, output_of
from tests.wal_receiver.helpers import VENV_BIN

BUCKET = "klio-test"


def retention(config: Path, *args: str) -> list[dict[str, Any]]:
    """``klio retention <args> --json`` (as root, like the service); its JSON documents."""
    done = klio(config, "retention", *args, "--json", as_postgres=False)
    assert done.returncode == 0, output_of(done)
    docs: list[dict[str, Any]] = json.loads(done.stdout)
    return docs


def one_shot(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``klio-retention --config F <args>`` as its own process (for kill -9)."""
    return subprocess.Popen(
        [str(VENV_BIN / "klio-retention"), "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def process_state(pid: int) -> str:
    """The state letter of a process (``T`` once it stopped itself)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def backdate(settings: Settings, backup_id: str, by: timedelta) -> None:
    """Move a committed backup's start and end times back (constructing age instead of waiting)."""
    catalog = catalog_of(settings)
    manifest = catalog.load(backup_id)
    older = msgspec.structs.replace(
        manifest, start_time=manifest.start_time - by, end_time=manifest.end_time - by
    )
    blob = encode_object(
        msgspec.json.encode(older),
        kind="manifest",
        name=backup_id,
        codec=catalog.codec,
        keyring=catalog.keyring,
    )
    fsio.atomic_write(catalog.manifest_path(backup_id), blob)


def tier1_bytes(settings: Settings, cluster: str = "main") -> int:
    """Stored bytes of what retention may delete on Tier 1: manifests, WAL and chunks."""
    assert settings.tier1 is not None
    root = settings.tier1.path / cluster
    total = 0
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        kind = kind_of(rel) if path.is_file() else None
        if kind in (Kind.WAL, Kind.PARTIAL, Kind.CHUNK, Kind.MANIFEST):
            total += path.stat().st_size
    return total


def bucket_sizes(s3: S3Server, prefix: str = "main/") -> dict[str, int]:
    """Key → size of every object under ``prefix``."""
    found: dict[str, int] = {}
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = item["Size"]
    return found


def download_bucket(s3: S3Server, dest: Path, cluster: str = "main") -> Path:
    """Copy the cluster's objects into ``dest/<cluster>/`` (the bucket mirrors Tier 1).

    ``dest`` becomes a Tier-1 root the read path can restore from: root:postgres, setgid.
    """
    client = s3.client()
    dest.mkdir(mode=0o2750)
    if os.geteuid() == 0:
        shutil.chown(dest, "root", "postgres")
    dest.chmod(0o2750)
    for key in bucket_sizes(s3, f"{cluster}/"):
        target = dest / key
        fsio.ensure_dir(target.parent, 0o750)
        target.write_bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        target.chmod(0o640)
    return dest
