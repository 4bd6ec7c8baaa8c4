"""The test harness itself, against the real servers: each fixture does what it promises."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import nats
import psycopg
import pytest
import yaml

from klio_common.pg.lsn import Lsn
from klio_common.runtime.settings import Settings
from klio_dev import (
    NatsServer,
    PostgresServer,
    S3Server,
    free_port,
    is_listening,
    run_as_postgres,
    scaled,
    wait_until,
    wait_until_async,
)
from klio_dev.processes import children_of, pid_alive
from tests.fixtures.paths import KlioConfigWriter
from tests.fixtures.postgres import PgFactory

REPO = Path(__file__).resolve().parents[2]


# -- waiting ------------------------------------------------------------------------


def test_wait_until_returns_the_first_truthy_value() -> None:
    values = iter([None, 0, "", "ready"])
    assert wait_until(lambda: next(values), 5, "a truthy value") == "ready"


def test_wait_until_names_what_it_waited_for() -> None:
    def refuse() -> bool:
        raise ConnectionRefusedError("nobody home")

    with pytest.raises(TimeoutError, match=r"waiting for the moon \(last error: nobody home\)"):
        wait_until(refuse, 0.05, "the moon", ignore=(ConnectionRefusedError,))


def test_timeouts_scale_with_the_multiplier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLIO_TEST_TIMEOUT_MULTIPLIER", "4")
    assert scaled(2.5) == 10.0


async def test_wait_until_async_accepts_coroutine_predicates() -> None:
    calls = 0

    async def third_time() -> int | None:
        nonlocal calls
        calls += 1
        return calls if calls >= 3 else None

    assert await wait_until_async(third_time, 5, "the third call") == 3


# -- directories --------------------------------------------------------------------


def _as_postgres_can_read(path: Path) -> bool:
    return run_as_postgres(["test", "-r", str(path)], check=False).returncode == 0


def test_workdir_is_traversable_by_postgres(workdir: Path) -> None:
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o755
    assert stat.S_IMODE(workdir.parent.stat().st_mode) == 0o755
    probe = workdir / "probe"
    probe.write_text("x")
    assert _as_postgres_can_read(probe)


def test_tier1_dir_passes_its_group_to_new_files(tier1_dir: Path) -> None:
    info = tier1_dir.stat()
    assert stat.S_IMODE(info.st_mode) == 0o2750
    assert info.st_uid == 0
    nested = tier1_dir / "main" / "wal"
    nested.mkdir(parents=True, mode=0o750)
    segment = nested / "000000010000000000000001"
    segment.write_bytes(b"wal")
    segment.chmod(0o640)
    assert segment.stat().st_gid == info.st_gid
    assert _as_postgres_can_read(segment)
    assert run_as_postgres(["touch", str(tier1_dir / "nope")], check=False).returncode != 0


def test_keyring_files_hold_32_bytes_readable_by_postgres(keyring_files: dict[str, Path]) -> None:
    assert sorted(keyring_files) == ["k1", "k2"]
    assert keyring_files["k1"].read_bytes() != keyring_files["k2"].read_bytes()
    for path in keyring_files.values():
        assert len(path.read_bytes()) == 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert _as_postgres_can_read(path)


def test_postgres_user_can_run_the_venv() -> None:
    """Pitfall P17: restore_command runs klio as the postgres OS user."""
    python = REPO / ".venv" / "bin" / "python"
    done = run_as_postgres([str(python), "-c", "import klio_common"], check=False)
    assert done.returncode == 0, (
        f"the postgres OS user cannot run {python} and import klio_common: "
        f"{done.stderr.strip()}\nHINT: build .venv from a Python that user can execute "
        "(Debian's /usr/bin/python3.11, `make venv`) and keep the checkout world-readable "
        "(chmod -R a+rX)"
    )


# -- PostgreSQL -----------------------------------------------------------------------


def test_pg_is_configured_for_klio(pg: PostgresServer) -> None:
    settings = dict(
        pg.sql(
            "SELECT name, setting FROM pg_settings WHERE name IN ('wal_level', 'data_checksums',"
            " 'fsync', 'password_encryption', 'max_wal_senders', 'listen_addresses')"
        )
    )
    assert settings == {
        "wal_level": "replica",
        "data_checksums": "on",
        "fsync": "on",
        "password_encryption": "scram-sha-256",
        "max_wal_senders": "10",
        "listen_addresses": "127.0.0.1",
    }
    data = pg.data_dir.stat()
    assert stat.S_IMODE(data.st_mode) == 0o700
    assert data.st_uid == int(run_as_postgres(["id", "-u"]).stdout)
    assert pg.password_file.read_text().strip() == pg.password
    assert stat.S_IMODE(pg.password_file.stat().st_mode) == 0o600


def test_klio_role_logs_in_with_scram_and_replicates(pg: PostgresServer) -> None:
    with psycopg.connect(pg.conninfo()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("klio",)
    with psycopg.connect(pg.conninfo(replication="true"), autocommit=True) as conn:
        row = conn.execute("IDENTIFY_SYSTEM").fetchone()
        assert row is not None and int(row[0]) == pg.system_identifier()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.conninfo(password="wrong")).close()
    assert "password" not in pg.conninfo(include_password=False)


def test_pg_survives_kill_and_restart(pg: PostgresServer) -> None:
    pg.execute("CREATE TABLE kept (v int)")
    pg.execute("INSERT INTO kept VALUES (42)")
    postmaster = pg.postmaster_pid()
    assert postmaster is not None
    backends = children_of(postmaster)
    assert backends
    pg.kill()
    assert not pg.running
    assert not any(pid_alive(p) for p in [postmaster, *backends])
    assert not is_listening(pg.port)
    pg.kill()  # idempotent
    pg.start()
    assert pg.sql("SELECT v FROM kept") == [(42,)]
    pg.restart()
    pg.stop()
    pg.stop()  # idempotent
    assert not pg.running


def test_pg_set_config_and_wal_helpers(pg: PostgresServer) -> None:
    pg.set_config(work_mem="7MB", log_min_duration_statement=-1)
    assert pg.sql("SHOW work_mem") == [("7MB",)]
    before = pg.current_lsn()
    assert isinstance(before, Lsn)
    pg.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS v")
    segment = pg.switch_wal()
    assert pg.current_lsn() > before
    assert (pg.pg_wal_dir / segment).exists()
    dump = pg.run_as_postgres(["pg_waldump", str(pg.pg_wal_dir / segment)], check=False)
    assert "CREATE" in dump.stdout or "Heap" in dump.stdout


def test_pgbench_runs_against_pg(pg: PostgresServer) -> None:
    pg.pgbench_init(scale=1)
    done = pg.pgbench(clients=2, transactions=20)
    assert "number of transactions actually processed: 40/40" in done.stdout


def test_standby_follows_and_promotes(pg: PostgresServer) -> None:
    pg.execute("CREATE TABLE before_failover (v int)")
    standby = pg.make_standby("standby")
    assert standby.port != pg.port
    assert standby.sql("SELECT pg_is_in_recovery()") == [(True,)]
    assert standby.system_identifier() == pg.system_identifier()
    pg.execute("INSERT INTO before_failover VALUES (1)")
    target = pg.current_lsn()
    wait_until(lambda: standby.current_lsn() >= target, 30, "the standby to replay")
    pg.kill()
    standby.promote()
    assert standby.sql("SELECT pg_is_in_recovery()") == [(False,)]
    timeline = standby.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
    assert timeline == [("00000002",)]
    assert standby.sql("SELECT v FROM before_failover") == [(1,)]
    with psycopg.connect(standby.conninfo()) as conn:
        conn.execute("SELECT 1")


def test_pg_factory_makes_independent_clusters(pg_factory: PgFactory) -> None:
    first = pg_factory("a")
    second = pg_factory("b", settings={"max_wal_senders": 4}, start=False)
    assert not second.running
    second.start()
    assert second.sql("SHOW max_wal_senders") == [("4",)]
    assert first.system_identifier() != second.system_identifier()


# -- NATS and S3 ----------------------------------------------------------------------


async def test_nats_restart_keeps_port_and_store(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="HARNESS", subjects=["harness.>"])
        await js.publish("harness.one", b"kept")
    finally:
        await nc.close()
    port, pid = nats_server.port, nats_server.pid
    nats_server.stop()
    nats_server.stop()  # idempotent
    assert not is_listening(port)
    nats_server.start()
    nats_server.kill()
    nats_server.start()
    assert (nats_server.port, nats_server.running) == (port, True)
    assert nats_server.pid != pid
    nc = await nats.connect(nats_server.url)
    try:
        msg = await nc.jetstream().get_msg("HARNESS", seq=1)
        assert msg.data == b"kept"
    finally:
        await nc.close()


def test_s3_server_serves_the_test_bucket_from_memory(s3_server: S3Server) -> None:
    client = s3_server.client()
    assert [b["Name"] for b in client.list_buckets()["Buckets"]] == ["klio-test"]
    body = os.urandom(6 << 20)  # above moto's default spool-to-disk threshold
    client.put_object(Bucket="klio-test", Key="big", Body=body)
    assert client.get_object(Bucket="klio-test", Key="big")["Body"].read() == body
    assert sorted(p.name for p in s3_server.dir.iterdir()) == ["s3.log"]
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_server.env()["AWS_ACCESS_KEY_ID"]
    s3_server.stop()
    s3_server.stop()  # idempotent
    s3_server.start()
    assert s3_server.client().list_buckets()["Buckets"] == []


@pytest.mark.parametrize("kind", ["postgres", "nats", "s3"])
def test_first_start_moves_off_a_port_taken_meanwhile(
    kind: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        module = "klio_dev.postgres" if kind == "postgres" else "klio_dev.processes"
        monkeypatch.setattr(f"{module}.free_port", lambda: next(ports, free_port()))
        server: PostgresServer | NatsServer | S3Server
        if kind == "postgres":
            server = PostgresServer(workdir).init()
        else:
            server = NatsServer(workdir) if kind == "nats" else S3Server(workdir)
        assert server.port == taken
        try:
            server.start()
            assert server.port != taken
            assert is_listening(server.port)
        finally:
            server.stop()


# -- config and process hygiene -------------------------------------------------------


def test_klio_config_describes_the_servers(
    klio_config: KlioConfigWriter,
    pg: PostgresServer,
    nats_server: NatsServer,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
) -> None:
    path = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, keys=keyring_files)
    doc = yaml.safe_load(path.read_text())
    assert doc["nats"] == {"url": nats_server.url}
    assert doc["tier1"] == {"path": str(tier1_dir)}
    assert doc["encryption"]["active"] == "k1"
    assert doc["encryption"]["keys"] == {k: str(p) for k, p in keyring_files.items()}
    (cluster,) = doc["clusters"]
    assert cluster["name"] == "main" and cluster["slot"] == "klio"
    assert pg.password not in path.read_text()
    assert cluster["password_file"] == str(pg.password_file)
    conninfo = f"{cluster['conninfo']} password={pg.password_file.read_text().strip()}"
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("klio",)
    ports = {s["http_port"] for s in doc["services"].values()}
    assert len(ports) == 4
    assert _as_postgres_can_read(path)
    settings = Settings.load(path, {})
    assert settings.cluster("main").password_file == pg.password_file
    assert settings.tier1 is not None and settings.tier1.path == tier1_dir


def test_servers_are_killed_at_interpreter_exit(workdir: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from klio_dev import NatsServer, PostgresServer
        pg = PostgresServer(Path({str(workdir)!r})).init().start()
        nats = NatsServer(Path({str(workdir)!r})).start()
        print(pg.postmaster_pid(), nats.pid, pg.port, nats.port)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=scaled(60)
    )
    assert done.returncode == 0, done.stderr
    postmaster, nats_pid, pg_port, nats_port = (int(v) for v in done.stdout.split())
    assert not pid_alive(postmaster)
    assert not pid_alive(nats_pid)
    assert not is_listening(pg_port) and not is_listening(nats_port)


def test_leaked_asyncio_task_fails_the_test(workdir: Path) -> None:
    test_file = workdir / "test_leaky.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import asyncio

            async def test_leaks():
                asyncio.get_running_loop().create_task(asyncio.sleep(3600), name="forgotten")

            async def test_tidy():
                task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
                await task
            """
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.fixtures.hygiene",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            "-q",
            str(test_file),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=scaled(120),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    # The check runs at teardown, so pytest reports the leak as an error of that test.
    assert "2 passed, 1 error" in done.stdout
    assert "ERROR" in done.stdout and "test_leaky.py::test_leaks" in done.stdout
    assert "leaked 1 asyncio task(s), now cancelled: forgotten" in done.stdout
