"""The benchmark lab: one PostgreSQL, one nats-server, a key, Klio configurations and timing."""

from __future__ import annotations

import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from klio_dev import PG_BIN, NatsServer, PostgresServer, run_as_postgres, wait_until
from klio_dev.processes import tail

VENV_BIN = Path(sys.executable).parent  # not resolved: the venv's python is a symlink
CLUSTER = "main"
SEGMENT = 16 * 1024 * 1024
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    """Print a progress line on stderr (long runs must show they are alive)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def children_cpu() -> float:
    """User + system seconds of every child this process has waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """User + system seconds a live process (all its threads) has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


def drop_tree(path: Path) -> None:
    """Remove a run's output and flush the page cache, so runs don't share write-back."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()


@dataclass
class Lab:
    """The servers and directories every benchmark uses.

    Args:
        quick: the smoke-test sizes.
        slots: replication slots the benchmarks may hold at once.
    """

    quick: bool
    slots: int = 10
    root: Path = field(init=False)
    pg: PostgresServer = field(init=False)
    nats: NatsServer = field(init=False)
    key_file: Path = field(init=False)
    keep: bool = False

    def __post_init__(self) -> None:
        # Under /tmp and 0755: the postgres OS user must traverse it (pytest's tmp_path is 0700).
        self.root = Path(tempfile.mkdtemp(prefix="klio-bench-", dir="/tmp"))
        self.root.chmod(0o755)
        self.pg = PostgresServer(
            self.root,
            settings={
                "shared_buffers": "512MB",
                "max_wal_size": "64GB",
                "checkpoint_timeout": "1d",
                "max_replication_slots": self.slots + 4,
                "max_wal_senders": 10,
                "synchronous_commit": "on",
            },
        )
        self.nats = NatsServer(self.root)
        self.key_file = self.root / "k1"
        self.key_file.write_bytes(secrets.token_bytes(32))
        self.key_file.chmod(0o600)

    def __enter__(self) -> Self:
        say(f"starting PostgreSQL and nats-server in {self.root}")
        self.pg.init()
        self.pg.start()
        self.nats.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.nats.stop()
        self.pg.stop("fast")
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- PostgreSQL helpers ---------------------------------------------------------------------

    def lsn(self, expression: str = "pg_current_wal_lsn()") -> int:
        """Evaluate a pg_lsn expression as an integer."""
        return int(self.pg.sql(f"SELECT ({expression} - '0/0'::pg_lsn)::bigint")[0][0])

    def create_slots(self, names: list[str]) -> dict[str, int]:
        """Create physical slots reserving WAL now (after a checkpoint); return their restart LSNs.

        A physical slot reserves from the last checkpoint's redo pointer (pitfall P4): the
        checkpoint first makes that the current position, and every slot gets the same one.
        """
        self.pg.execute("CHECKPOINT")
        for name in names:
            self.pg.execute("SELECT pg_create_physical_replication_slot(%s, true)", [name])
        rows = self.pg.sql(
            "SELECT slot_name, (restart_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots"
            " WHERE slot_name = ANY(%s)",
            [names],
        )
        return {str(name): int(lsn) for name, lsn in rows}

    def drop_slots(self, names: list[str]) -> None:
        """Drop the named slots (missing ones are ignored)."""
        self.pg.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = ANY(%s)",
            [names],
        )

    def generate_wal(self, target: int, *, pgbench_share: float) -> int:
        """Write at least ``target`` bytes of WAL; return how many were written.

        ``pgbench_share`` of it comes from ``pgbench -i`` (very compressible, pitfall P14), the
        rest from rows of random text and numbers (about 2x compressible), so compression works
        on a realistic mix.
        """
        start = self.lsn()
        scale = round(target * pgbench_share / 13_000_000)  # pgbench -i: ~13 MB of WAL per scale
        if scale > 0:
            say(f"pgbench -i -s {scale}")
            self.pgbench_init(scale)
        self.pg.execute(
            "CREATE TABLE IF NOT EXISTS bench_random (id bigserial PRIMARY KEY, a text,"
            " b bigint, c timestamptz, d text)"
        )
        batch = 20_000 if self.quick else 100_000
        while (done := self.lsn() - start) < target:
            self.pg.execute(
                "INSERT INTO bench_random (a, b, c, d) SELECT md5(random()::text),"
                " (random() * 9e18)::bigint, now() - random() * interval '3650 days',"
                " md5(random()::text) || ' ' || md5(random()::text) || ' '"
                " || substr(md5(random()::text), 1, (random() * 32)::int)"
                " FROM generate_series(1, %s)",
                [batch],
            )
        say(f"generated {done / 1e6:.0f} MB of WAL")
        return done

    def switch_wal(self) -> int:
        """Finish the current segment; return where it ends (a segment boundary).

        From what ``pg_switch_wal()`` reports (the end of its switch record), not from the current
        position: autovacuum or hint bits (with data checksums, they write full-page images) may
        write WAL right after the switch, and a caller waiting for the segment of a position past
        it would wait for a segment nothing fills.
        """
        switched = self.lsn("pg_switch_wal()")
        size = int(self.pg.sql("SELECT pg_size_bytes(current_setting('wal_segment_size'))")[0][0])
        return -(-switched // size) * size

    def pgbench_init(self, scale: int) -> None:
        """``pgbench -i -s scale`` in database postgres."""
        self.pg.pgbench_init(scale)

    def pgbench(self, seconds: int) -> float:
        """``pgbench -c 4 -j 2 -T seconds``; return the TPS it reports."""
        done = run_as_postgres(
            [
                "pgbench",
                "-c",
                "4",
                "-j",
                "2",
                "-T",
                str(seconds),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.pg.port),
                "-U",
                "postgres",
                "postgres",
            ],
            timeout=seconds + 600,
        )
        match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", done.stdout)
        if match is None:
            raise RuntimeError(f"no TPS in the pgbench report:\n{done.stdout}")
        return float(match.group(1))

    def replication_conninfo(self, application_name: str) -> str:
        """A replication conninfo for the ``klio`` role (password from PGPASSWORD)."""
        return self.pg.conninfo(
            include_password=False, replication="true", application_name=application_name
        )

    def pg_receivewal(self, *args: str) -> list[str]:
        """The pg_receivewal command line with ``args`` after the connection options."""
        return [str(PG_BIN / "pg_receivewal"), "--no-password", *args]

    def client_env(self) -> dict[str, str]:
        """Environment for PostgreSQL client programs run by root: the klio role's password."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        return {**env, "PGPASSWORD": self.pg.password}

    # -- Klio ------------------------------------------------------------------------------------

    def klio_config(
        self,
        directory: Path,
        *,
        slot: str,
        encrypted: bool,
        compression: str,
        synchronous: bool = False,
        application_name: str | None = None,
    ) -> Path:
        """Write a Klio configuration with its own Tier-1 directory under ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        tier1 = directory / "tier1"
        tier1.mkdir(exist_ok=True)
        cluster: dict[str, Any] = {
            "name": CLUSTER,
            "conninfo": self.pg.conninfo(include_password=False),
            "password_file": str(self.pg.password_file),
            "slot": slot,
            "synchronous": synchronous,
        }
        if application_name is not None:
            cluster["application_name"] = application_name
        doc: dict[str, Any] = {
            "nats": {"url": self.nats.url},
            "tier1": {"path": str(tier1)},
            # The levels are Klio's defaults (compression.wal_level, backup_level), as users
            # run it; the report states them.
            "compression": {"algorithm": compression},
            "clusters": [cluster],
            "services": {"wal-receiver": {"http_port": 0, "http_host": "127.0.0.1"}},
        }
        if encrypted:
            doc["encryption"] = {"active": "k1", "keys": {"k1": str(self.key_file)}}
        path = directory / "klio.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path


class Child:
    """A long-running child process (a WAL receiver) with its output in a log file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log = log
        with log.open("ab") as out:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches run.py, not this
            )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def check_alive(self) -> None:
        """Raise with the log tail when the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{Path(self.argv[0]).name} exited with status {self.proc.returncode}\n"
                f"--- {self.log} ---\n{tail(self.log)}"
            )

    def wait_for(self, predicate: Any, timeout: float, what: str) -> float:
        """Poll ``predicate`` (failing fast if the process dies); return seconds since start."""

        def ready() -> bool:
            self.check_alive()
            return bool(predicate())

        wait_until(ready, timeout, what, interval=0.01)
        return time.perf_counter() - self.started

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` and wait for the exit (SIGKILL after ``timeout``); return the status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def klio_receiver(config: Path, log: Path) -> Child:
    """Start ``klio-wal-receiver --config config``."""
    return Child([str(VENV_BIN / "klio-wal-receiver"), "--config", str(config)], log)
