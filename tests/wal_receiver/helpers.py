"""Running the wal-receiver against the real servers, and reading back what it archived."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import yaml

from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.partial import read_partial
from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import WalSegment
from klio_common.runtime.settings import Settings
from klio_dev.waiting import wait_until
from tests.services import ServiceProcess, service_inprocess, stream_events

VENV_BIN = Path(sys.executable).parent
KLIO = VENV_BIN / "klio"


def write_config(
    path: Path,
    *,
    pg: Any,
    nats_url: str,
    tier1: Path,
    keys: dict[str, Path] | None,
    synchronous: bool = False,
    status_interval: float = 1.0,
    compression: str = "zstd",
    cluster: str = "main",
    conninfo: str | None = None,
    password_file: Path | None = None,
    http_port: int = 0,
) -> Path:
    """Write a Klio YAML configuration for one cluster and return its path."""
    doc: dict[str, Any] = {
        "nats": {"url": nats_url},
        "tier1": {"path": str(tier1)},
        "compression": {"algorithm": compression, "level": 3},
        "clusters": [
            {
                "name": cluster,
                "conninfo": conninfo or pg.conninfo(include_password=False),
                "password_file": str(password_file or pg.password_file),
                "slot": "klio",
                "synchronous": synchronous,
                "status_interval": status_interval,
            }
        ],
        "services": {"wal-receiver": {"http_port": http_port, "http_host": "127.0.0.1"}},
    }
    if keys:
        doc["encryption"] = {
            "active": next(iter(keys)),
            "keys": {k: str(v) for k, v in keys.items()},
        }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o644)
    return path


def load(config: Path) -> Settings:
    return Settings.load(config, {})


def archive_of(settings: Settings, cluster: str = "main") -> WalArchive:
    assert settings.tier1 is not None
    return WalArchive(settings.tier1.path, cluster)


def keyring_of(settings: Settings) -> KeyRing:
    return settings.encryption.keyring() if settings.encryption else KeyRing.none()


def archive_end(settings: Settings, cluster: str = "main") -> int:
    """The LSN up to which the archive holds WAL durably (complete segments + open partial)."""
    archive = archive_of(settings, cluster)
    if archive.read_identity() is None:
        return 0
    seg_size = archive.segment_size()
    end = 0
    # Partials first: the receiver removes one only after its segment's object is stored, so a
    # partial that vanishes meanwhile is in the segment listing below.
    if archive.open_dir.is_dir():
        for p in archive.open_dir.glob("*.partial"):
            try:
                _, _, valid = read_partial(p, keyring_of(settings), source=str(p))
            except FileNotFoundError:
                continue
            seg = WalSegment.parse(p.name.removesuffix(".partial"), seg_size)
            end = max(end, int(seg.start_lsn) + valid)
    segs = archive.list_segments(seg_size)
    if segs:
        end = max(end, int(segs[-1].end_lsn))
    return end


def receiver_inprocess(settings: Settings) -> AbstractContextManager[None]:
    """Run the real wal-receiver service in this process (on its own thread and event loop).

    The test body stays synchronous (pgbench, psql, polling) while the service streams.
    """
    from klio_wal_receiver.service import SERVICE, main

    return service_inprocess(SERVICE, main, settings, join_timeout=60)


class ReceiverProcess(ServiceProcess):
    """The real ``klio-wal-receiver`` as a separate process (for kill -9 and SIGSTOP tests)."""

    def __init__(self, config: Path, log: Path) -> None:
        super().__init__("wal-receiver", config, log)


def wait_archived(
    settings: Settings, lsn: int, *, timeout: float = 60, cluster: str = "main"
) -> None:
    """Wait until the archive durably holds WAL up to ``lsn``."""
    wait_until(
        lambda: archive_end(settings, cluster) >= lsn, timeout, f"archive to reach {Lsn(lsn)}"
    )


def wait_closed(
    settings: Settings, lsn: int, *, timeout: float = 60, cluster: str = "main"
) -> None:
    """Wait until the segment holding the byte before ``lsn`` is closed (restorable) in the archive.

    ``restore_command`` only finds complete segments, so a restore test must wait for this, not
    for the open ``.partial`` to cover ``lsn``.
    """
    archive = archive_of(settings, cluster)
    wait_until(lambda: archive.read_identity() is not None, timeout, "the archive identity")
    seg_size = archive.segment_size()

    def closed() -> bool:
        return any(s.start_lsn < lsn <= s.end_lsn for s in archive.list_segments(seg_size))

    wait_until(
        closed,
        timeout,
        f"the segment holding {WalSegment.from_lsn(1, lsn - 1, seg_size).name[8:]} closed",
    )


def close_segment(pg: Any, settings: Settings, *, cluster: str = "main") -> str:
    """Switch WAL on ``pg`` and wait until the segment it finished is closed in the archive.

    Returns:
        That segment's name (as ``pg_walfile_name(pg_switch_wal())`` gives it).
    """
    end = pg.current_lsn()
    name: str = pg.switch_wal()
    wait_closed(settings, end, cluster=cluster)
    return name


def wait_segment(
    settings: Settings, name: str, *, timeout: float = 60, cluster: str = "main"
) -> None:
    """Wait until segment ``name`` is closed in the archive."""
    archive = archive_of(settings, cluster)
    wait_until(lambda: archive.segment_path(name).exists(), timeout, f"segment {name} archived")


def wal_restore(
    config: Path, name: str, dest: Path, *, as_postgres: bool = False, prefetch: int | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``klio wal-restore`` as PostgreSQL would (``prefetch=0``: no prefetch spool)."""
    options = [] if prefetch is None else ["--prefetch", str(prefetch)]
    argv = [str(KLIO), "--config", str(config), "wal-restore", *options, name, str(dest)]
    if as_postgres and os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    return subprocess.run(argv, capture_output=True, timeout=60, check=False)


def wal_verify(config: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``klio wal verify`` (continuity and every segment's checksum)."""
    argv = [str(KLIO), "--config", str(config), "wal", "verify"]
    return subprocess.run(argv, capture_output=True, timeout=300, check=False)


def restored_server(
    workdir: Path,
    backup: Path,
    *,
    restore_command: str,
    settings: dict[str, Any] | None = None,
    name: str = "restored",
) -> Any:
    """A PostgreSQL made from a plain base backup that recovers through ``restore_command``."""
    import shutil

    from klio_dev import PostgresServer
    from klio_dev.postgres import run_as_postgres

    server = PostgresServer(
        workdir,
        name=name,
        settings={
            "restore_command": restore_command,
            "recovery_target_action": "promote",
            **(settings or {}),
        },
    )
    server._prepare_root()
    shutil.move(str(backup), str(server.data_dir))
    server._write_config()
    run_as_postgres(["touch", str(server.data_dir / "recovery.signal")])
    server._write_password_file()
    return server


def announced(nats_url: str, subject: str) -> list[str]:
    """The ``segment`` of every event stored in the stream on ``subject`` (oldest first)."""
    return [e["segment"] for e in stream_events(nats_url, subject)]


def postgres_dir(path: Path) -> Path:
    """An empty directory owned by the postgres OS user (for pg_basebackup -D)."""
    import shutil

    path.mkdir(mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")
    return path


def random_row(table: str, megabytes: int) -> str:
    """An INSERT of one ``bytea`` row of ``megabytes`` random bytes into ``table``: data (and WAL)
    that no compression shrinks, to fill volumes with."""
    return (
        f"INSERT INTO {table} SELECT decode(string_agg(md5(random()::text), ''), 'hex')"
        f" FROM generate_series(1, {megabytes * 65536})"
    )


@contextmanager
def synchronous_standby(pg: Any, name: str = "klio") -> Iterator[None]:
    """The receiver streaming as ``name`` made the primary's synchronous standby, for the block
    (every COMMIT then waits for its flush); ``synchronous_standby_names`` is reset after it."""
    wait_until(
        lambda: (
            pg.sql(
                "SELECT count(*) FROM pg_stat_replication "
                f"WHERE application_name = '{name}' AND state = 'streaming'"
            )[0][0]
            == 1
        ),
        60,
        "the receiver streaming",
    )
    pg.set_config(synchronous_standby_names=name)
    try:
        wait_until(
            lambda: (
                pg.sql(
                    f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'"
                )[0][0]
                == "sync"
            ),
            30,
            f"{name} to be the synchronous standby",
        )
        yield
    finally:
        pg.set_config(synchronous_standby_names="")
