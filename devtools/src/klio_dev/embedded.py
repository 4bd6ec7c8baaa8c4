"""`make run`: the whole system on its embedded default, or on ``KLIO_CONFIG`` when it is set.

With no configuration it makes a scratch PostgreSQL 15 cluster (initdb, data checksums on), a
local nats-server with JetStream, a local S3-compatible endpoint (moto) for Tier 2, an encryption
key, and a Klio configuration for them; then it runs the Klio services as processes and shows live
status until Ctrl-C. Only the services that exist so far are started (``SERVICES``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from klio_dev.nats import NatsServer
from klio_dev.postgres import PostgresServer
from klio_dev.s3 import S3Server
from klio_dev.waiting import wait_until

SERVICES = ["wal-receiver", "basebackup", "relay", "retention"]  # the services built so far
BIN = Path(sys.executable).parent


def _scratch_dir() -> Path:
    base = Path(tempfile.mkdtemp(prefix="klio-run-"))
    base.chmod(0o755)  # PostgreSQL runs as the postgres OS user and must traverse it
    return base


def _tier1(base: Path) -> Path:
    tier1 = base / "tier1"
    tier1.mkdir()
    if os.geteuid() == 0:
        shutil.chown(tier1, "root", "postgres")
        tier1.chmod(0o2750)  # setgid: the postgres user reads what the services write
    return tier1


def scratch_config(base: Path) -> tuple[Path, list[Any]]:
    """Start scratch PostgreSQL, NATS and S3; write a configuration for them."""
    pg = PostgresServer(base, name="pg").init().start()
    nats = NatsServer(base)
    nats.start()
    s3 = S3Server(base)
    s3.start()
    s3.create_bucket("klio")
    os.environ.update(s3.env())
    key = base / "keys" / "k1"
    key.parent.mkdir(mode=0o750)
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o640)
    if os.geteuid() == 0:
        shutil.chown(key.parent, "root", "postgres")
        shutil.chown(key, "root", "postgres")
    config = {
        "nats": {"url": nats.url},
        "tier1": {"path": str(_tier1(base))},
        "tier2": {"s3": {"bucket": "klio", "prefix": "scratch/", "endpoint_url": s3.endpoint_url}},
        "encryption": {"active": "k1", "keys": {"k1": str(key)}},
        "compression": {"algorithm": "zstd", "level": 3},
        "clusters": [
            {
                "name": "main",
                "conninfo": pg.conninfo(include_password=False),
                "password_file": str(pg.password_file),
                "slot": "klio",
                "status_interval": 2.0,
            }
        ],
    }
    path = base / "klio.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o644)
    return path, [pg, nats, s3]


def start_services(config: Path, logs: Path) -> list[subprocess.Popen[bytes]]:
    """Start each Klio service as a process, logging to ``logs/<service>.log``."""
    logs.mkdir(exist_ok=True)
    procs = []
    for name in SERVICES:
        with (logs / f"{name}.log").open("ab") as out:
            procs.append(
                subprocess.Popen(
                    [str(BIN / f"klio-{name}"), "--config", str(config)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def status_text(config: Path) -> str:
    """What `klio wal status` says right now."""
    done = subprocess.run(
        [str(BIN / "klio"), "--config", str(config), "wal", "status"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return (done.stdout or done.stderr).strip()


def _archived_segments(config: Path) -> int:
    tier1 = Path(yaml.safe_load(config.read_text())["tier1"]["path"]) / "main" / "wal"
    return sum(1 for p in tier1.glob("*/0*") if not p.name.endswith(".partial"))


def request_first_backup(config: Path, timeout: float = 60) -> str | None:
    """Ask klio-basebackup for a backup of ``main`` (as ``klio backup run`` does); wait for it.

    Returns:
        The committed backup's id, or None when it is not committed within ``timeout`` seconds.
    """
    import asyncio

    from klio_common.events import BackupRequested, now
    from klio_common.events.codec import new_event_id
    from klio_common.runtime.bus import Bus
    from klio_common.runtime.settings import Settings

    settings = Settings.load(config, {})

    async def publish() -> None:
        bus = await Bus.connect(settings.nats, name="klio-make-run", reconnect=False)
        try:
            await bus.ensure_stream()
            await bus.publish_event(
                BackupRequested(
                    event_id=new_event_id(),
                    occurred_at=now(),
                    cluster="main",
                    system_id="0",
                    request_id=new_event_id(),
                    requested_by="make run",
                )
            )
        finally:
            await bus.close()

    asyncio.run(publish())
    assert settings.tier1 is not None
    backups = settings.tier1.path / "main" / "backups"
    try:
        found = wait_until(
            lambda: sorted(p.parent.name for p in backups.glob("*/manifest")),
            timeout,
            "the first base backup",
            interval=0.5,
        )
    except TimeoutError:
        return None
    return found[0]


def main(argv: list[str] | None = None) -> int:
    """Run until Ctrl-C (or ``--duration`` seconds); 0 on a clean stop."""
    parser = argparse.ArgumentParser(prog="make run", description=__doc__)
    parser.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    parser.add_argument("--interval", type=float, default=5.0, help="status refresh, seconds")
    args = parser.parse_args(argv)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    servers: list[Any] = []
    base = _scratch_dir()
    env_config = os.environ.get("KLIO_CONFIG")
    try:
        if env_config:
            config = Path(env_config)
            print(f"klio: running the services against {config}")
        else:
            print(f"klio: starting scratch PostgreSQL 15, nats-server and S3 in {base}")
            config, servers = scratch_config(base)
        procs = start_services(config, base / "logs")
        print(f"klio: configuration {config}; service logs in {base / 'logs'}")
        print(f"klio: try  {BIN / 'klio'} --config {config} wal status")
        if servers:
            pg = servers[0]
            print(f"klio: psql '{pg.superuser_conninfo()}'")
            # give the archive something to show: a little data and a closed segment
            pg.pgbench_init(scale=1)
            pg.switch_wal()
            wait_until(lambda: _archived_segments(config) > 0, 120, "a first archived segment")
            wait_until(lambda: "streaming" in status_text(config), 60, "the receiver streaming")
            print("klio: taking a first base backup", flush=True)
            backup_id = request_first_backup(config)
            print(
                f"klio: first base backup {backup_id} committed; try  {BIN / 'klio'} --config "
                f"{config} backup list"
                if backup_id
                else "klio: the first base backup is not done yet; see logs/basebackup.log",
                flush=True,
            )
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stopping and (deadline is None or time.monotonic() < deadline):
            print(f"\n--- {time.strftime('%H:%M:%S')} ---\n{status_text(config)}", flush=True)
            for name, proc in zip(SERVICES, procs, strict=True):
                if proc.poll() is not None:
                    print(f"klio: {name} exited with {proc.returncode}; see its log")
                    return 1
            end = time.monotonic() + args.interval
            while not stopping and time.monotonic() < end:
                time.sleep(0.2)
        print("klio: stopping")
        for proc in procs:
            proc.terminate()
        codes = [proc.wait(60) for proc in procs]
        return 0 if all(c == 0 for c in codes) else 1
    finally:
        for server in reversed(servers):
            server.stop()
        if not env_config and not os.environ.get("KLIO_KEEP_RUN"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
