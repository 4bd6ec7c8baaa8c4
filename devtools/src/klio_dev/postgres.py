"""A real PostgreSQL 15 cluster for tests: initdb, pg_ctl, SQL, pgbench, standbys."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg

from klio_common.pg.lsn import Lsn
from klio_dev.osuser import PG_BIN, owned_by_postgres, run_as_postgres
from klio_dev.ports import free_port
from klio_dev.processes import (
    ServerError,
    children_of,
    kill_pids,
    pid_alive,
    port_taken,
    tail,
    track,
    untrack,
)
from klio_dev.waiting import scaled

KLIO_ROLE = "klio"
__all__ = ["KLIO_ROLE", "PG_BIN", "PostgresServer", "SettingValue", "run_as_postgres"]
SettingValue = str | int | float | bool

_CONF_FILE = "klio_test.conf"
_HBA = """\
local all all trust
host all postgres 127.0.0.1/32 trust
host replication klio 127.0.0.1/32 scram-sha-256
host all klio 127.0.0.1/32 scram-sha-256
host replication postgres 127.0.0.1/32 trust
"""


def _quote_conninfo(value: str) -> str:
    if value and not any(c in value for c in " '\\\t\n"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _setting_text(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


class PostgresServer:
    """One PostgreSQL 15 cluster in ``base_dir / name``, run as the ``postgres`` OS user.

    The directory holds ``data/`` (0700, owned by postgres), the Unix socket, the server
    log ``postgresql.log`` and ``klio.password`` (the ``klio`` role's password, root only).

    Args:
        base_dir: a directory the postgres user can traverse.
        port: TCP port on 127.0.0.1, or None for a free one.
        name: the cluster's directory name.
        settings: postgresql.conf settings added to (or replacing) the harness defaults.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        name: str = "pg",
        settings: Mapping[str, SettingValue] | None = None,
    ) -> None:
        self.name = name
        self.root = base_dir / name
        self.port = port if port is not None else free_port()
        self._auto_port = port is None
        self._started = False
        self.settings: dict[str, SettingValue] = dict(settings or {})
        self.password = secrets.token_urlsafe(24)
        self.password_file = self.root / "klio.password"
        self.log_path = self.root / "postgresql.log"
        self.standbys: list[PostgresServer] = []

    @property
    def data_dir(self) -> Path:
        """The data directory (PGDATA)."""
        return self.root / "data"

    @property
    def pg_wal_dir(self) -> Path:
        """The data directory's ``pg_wal``."""
        return self.data_dir / "pg_wal"

    def describe(self) -> str:
        """Name the server in messages."""
        return f"PostgreSQL '{self.name}' on port {self.port} in {self.root}"

    # -- lifecycle -----------------------------------------------------------------

    def _prepare_root(self) -> None:
        if self.data_dir.exists():
            raise ServerError(f"{self.data_dir} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        owned_by_postgres(self.root, 0o755)

    def init(self) -> Self:
        """Create the cluster (initdb), write its configuration and create the ``klio`` role.

        The server is left stopped; call `start`.

        Raises:
            ServerError: the data directory exists or initdb failed.
        """
        self._prepare_root()
        initdb = ["initdb", "-D", str(self.data_dir), "--data-checksums", "-A", "trust"]
        initdb += ["--auth-host=scram-sha-256", "-U", "postgres", "--encoding=UTF8"]
        # Tests kill processes, never the machine: the page cache is durable enough.
        run_as_postgres([*initdb, "--locale=C.UTF-8", "--no-sync", "--no-instructions"])
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\ninclude '{_CONF_FILE}'\n")
        self._write_config()
        self._write_file(self.data_dir / "pg_hba.conf", _HBA)
        # Single-user mode creates the role without opening a port, which keeps init() quick.
        run_as_postgres(
            [
                "postgres",
                "--single",
                "-D",
                str(self.data_dir),
                "-c",
                "exit_on_error=on",
                "postgres",
            ],
            input=f"CREATE ROLE {KLIO_ROLE} LOGIN REPLICATION PASSWORD '{self.password}';\n",
        )
        self._write_password_file()
        return self

    def _write_file(self, path: Path, text: str) -> None:
        path.write_text(text)
        owned_by_postgres(path, 0o600)

    def _write_config(self) -> None:
        values: dict[str, SettingValue] = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": str(self.root),
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "password_encryption": "scram-sha-256",
            "shared_buffers": "128MB",
            "max_wal_size": "1GB",
            "wal_keep_size": 0,
            "fsync": True,
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        values.update(self.settings)
        lines = [f"{k} = '{_setting_text(v)}'" for k, v in values.items()]
        self._write_file(self.data_dir / _CONF_FILE, "\n".join(lines) + "\n")

    def _write_password_file(self) -> None:
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)

    def postmaster_pid(self) -> int | None:
        """Return the postmaster's pid while it runs, else None."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return None
        pid = int(first) if first.strip().isdigit() else None
        return pid if pid is not None and pid_alive(pid) else None

    @property
    def running(self) -> bool:
        """True while the postmaster is alive."""
        return self.postmaster_pid() is not None

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        wait = str(int(scaled(timeout)))
        try:
            run_as_postgres(["pg_ctl", "-w", "-t", wait, "-D", str(self.data_dir), *args])
        except ServerError as exc:
            raise ServerError(f"{exc}\n--- {self.log_path} ---\n{tail(self.log_path)}") from exc

    def start(self) -> Self:
        """Start the server and wait until it accepts connections; no-op when running.

        Raises:
            ServerError: pg_ctl failed (the server log tail is included).
        """
        if self.running:
            return self
        track(self)
        try:
            self._pg_ctl("-l", str(self.log_path), "start")
        except ServerError as exc:
            # free_port() cannot reserve the port: someone may take it before the first start.
            if not port_taken(exc, self._auto_port and not self._started):
                raise
            self.port = free_port()
            self._write_config()
            self._pg_ctl("-l", str(self.log_path), "start")
        self._started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server with pg_ctl (``smart``, ``fast`` or ``immediate``); idempotent."""
        if self.running:
            self._pg_ctl("-m", mode, "stop")
        untrack(self)

    def kill(self) -> None:
        """SIGKILL the postmaster and its children at once, as a node crash would; idempotent."""
        pid = self.postmaster_pid()
        if pid is not None:
            # Children that outlived their postmaster would hold the shared memory and
            # block the next start, so they go too.
            kill_pids([pid, *children_of(pid)], self.describe())
            # The dead postmaster stays a zombie until init reaps it (seconds on some hosts),
            # and the next postmaster would take it for a live one holding the lock files.
            # On a real node crash the old pid is simply gone, which removing them mimics.
            socket_lock = self.root / f".s.PGSQL.{self.port}.lock"
            for lock in (self.data_dir / "postmaster.pid", socket_lock):
                lock.unlink(missing_ok=True)
        untrack(self)

    def restart(self) -> None:
        """Stop (fast) and start again."""
        self.stop()
        self.start()

    def reload(self) -> None:
        """Make the server re-read its configuration files."""
        self._pg_ctl("reload")

    def promote(self) -> None:
        """Promote this standby to a primary and wait until it accepts writes."""
        self._pg_ctl("promote")

    def __enter__(self) -> Self:
        if not self.data_dir.exists():
            self.init()
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for standby in self.standbys:
            standby.stop("immediate")
        self.stop("immediate")

    # -- connections and SQL -------------------------------------------------------

    def conninfo(
        self, user: str = KLIO_ROLE, *, include_password: bool = True, **extra: Any
    ) -> str:
        """Return a libpq conninfo string for this server over TCP.

        Args:
            user: the role; ``klio`` (default) authenticates with its password.
            include_password: put the ``klio`` password in the string.
            **extra: further keywords (``replication="true"``, ``dbname=...``).

        Returns:
            ``host=127.0.0.1 port=... user=... dbname=postgres [password=...] ...``.
        """
        params: dict[str, str] = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "user": user,
            "dbname": "postgres",
        }
        if user == KLIO_ROLE and include_password:
            params["password"] = self.password
        params.update({k: str(v) for k, v in extra.items()})
        return " ".join(f"{k}={_quote_conninfo(v)}" for k, v in params.items())

    def superuser_conninfo(self, **extra: Any) -> str:
        """Return a conninfo for the ``postgres`` superuser (trusted on 127.0.0.1)."""
        return self.conninfo("postgres", **extra)

    def sql(
        self, query: str, params: Sequence[Any] | None = None, *, dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run one statement as ``postgres`` (autocommit) and return its rows ([] if none)."""
        with psycopg.connect(self.superuser_conninfo(dbname=dbname), autocommit=True) as conn:
            cur = conn.execute(query.encode(), params)
            return cur.fetchall() if cur.description is not None else []

    def execute(self, query: str, params: Sequence[Any] | None = None) -> None:
        """Run one statement as ``postgres`` (autocommit), ignoring any rows."""
        self.sql(query, params)

    def set_config(self, **params: SettingValue) -> None:
        """``ALTER SYSTEM SET`` each parameter, then reload (restart yourself if it needs one)."""
        with psycopg.connect(self.superuser_conninfo(), autocommit=True) as conn:
            for name, value in params.items():
                conn.execute(
                    psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        psycopg.sql.Identifier(name), psycopg.sql.Literal(_setting_text(value))
                    )
                )
            conn.execute(b"SELECT pg_reload_conf()")

    def system_identifier(self) -> int:
        """Return the cluster's system identifier."""
        return int(self.sql("SELECT system_identifier FROM pg_control_system()")[0][0])

    def current_lsn(self) -> Lsn:
        """Return the current WAL position (the replay position on a standby)."""
        rows = self.sql(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint"
        )
        return Lsn(int(rows[0][0]))

    def switch_wal(self) -> str:
        """Force a WAL segment switch; return the name of the segment it finished."""
        return str(self.sql("SELECT pg_walfile_name(pg_switch_wal())")[0][0])

    # -- tools run as the postgres user -----------------------------------------------

    def run_as_postgres(
        self, argv: Sequence[str], *, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (``pg_waldump``, ``pg_checksums``...) as the postgres OS user.

        See the module-level `run_as_postgres`.
        """
        return run_as_postgres(argv, check=check, input=input)

    def _client_args(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]

    def pgbench_init(self, scale: int = 1) -> None:
        """Create and fill the pgbench tables at ``scale`` in database ``postgres``."""
        run_as_postgres(["pgbench", "-i", "-q", "-s", str(scale), *self._client_args(), "postgres"])

    def pgbench(
        self,
        clients: int = 1,
        *,
        seconds: float | None = None,
        transactions: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run pgbench against database ``postgres`` for ``seconds`` or ``transactions``.

        Args:
            clients: concurrent clients.
            seconds: run time (``-T``); give this or ``transactions``.
            transactions: transactions per client (``-t``).
            extra_args: further pgbench options.

        Returns:
            The finished pgbench process (its report is in ``stdout``).
        """
        if (seconds is None) == (transactions is None):
            raise ValueError("give exactly one of seconds and transactions")
        amount = ["-T", str(max(1, round(seconds)))] if seconds is not None else []
        amount += ["-t", str(transactions)] if transactions is not None else []
        jobs = str(min(clients, os.cpu_count() or 1))
        argv = ["pgbench", "-c", str(clients), "-j", jobs, *amount, *extra_args]
        return run_as_postgres([*argv, *self._client_args(), "postgres"], timeout=3600)

    def make_standby(self, name: str, *, start: bool = True) -> PostgresServer:
        """Clone this server with ``pg_basebackup -R`` into a streaming standby next to it.

        Args:
            name: the standby's directory name (under the same base directory).
            start: start the standby before returning.

        Returns:
            The standby, on its own port, with the same ``klio`` password.
        """
        standby = PostgresServer(self.root.parent, name=name, settings=self.settings)
        standby.password = self.password
        standby._prepare_root()
        clone = ["pg_basebackup", "-D", str(standby.data_dir), "-R", "-X", "stream", "-c", "fast"]
        run_as_postgres([*clone, "--no-sync", *self._client_args()])
        standby._write_config()
        standby._write_password_file()
        self.standbys.append(standby)
        return standby.start() if start else standby
