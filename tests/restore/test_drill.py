"""The restore drill: point-in-time recovery to every kind of target from real backups and WAL."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klio_dev import PostgresServer, ServerError
from klio_dev.postgres import run_as_postgres
from klio_dev.waiting import wait_until
from tests.basebackup.helpers import basebackup_inprocess
from tests.restore.helpers import Restored, backup_now, klio, restore_server, wait_ready
from tests.wal_receiver.helpers import close_segment, load, receiver_inprocess


@dataclass(frozen=True)
class Mark:
    """A marker row and what was true right after its transaction committed."""

    id: int
    xid: int
    after_time: str  # clock_timestamp() after the commit, before the next marker
    after_lsn: str  # pg_current_wal_insert_lsn() after the commit


def mark(pg: PostgresServer, row: int) -> Mark:
    xid = pg.sql(
        "INSERT INTO marker (id) VALUES (%s) RETURNING pg_current_xact_id()::text", (row,)
    )[0][0]
    at, lsn = pg.sql("SELECT clock_timestamp()::text, pg_current_wal_insert_lsn()::text")[0]
    return Mark(row, int(xid), at, lsn)


@dataclass(frozen=True)
class Case:
    """One restore of the drill: klio restore options and the marker rows it must hold."""

    name: str
    args: tuple[str, ...]
    rows: int  # markers 1..rows present, none after
    backup: str  # the backup the restore must choose
    stop_message: str | None  # what the server log says when recovery stops at the target


def run_case(workdir: Path, config: Path, case: Case) -> str | None:
    """Restore, recover, check; return a failure description or None."""
    restored: Restored | None = None
    try:
        restored = restore_server(workdir, config, case.name, *case.args)
        server = restored.server
        if restored.summary["backup_id"] != case.backup:
            return f"chose backup {restored.summary['backup_id']}, expected {case.backup}"
        server.start()
        wait_until(
            lambda: server.sql("SELECT NOT pg_is_in_recovery()")[0][0],
            120,
            f"{case.name}: promotion",
        )
        log = server.log_path.read_text()
        if case.stop_message is not None and case.stop_message not in log:
            return f"server log lacks {case.stop_message!r}:\n{log[-3000:]}"
        rows = [r[0] for r in server.sql("SELECT id FROM marker ORDER BY id")]
        if rows != list(range(1, case.rows + 1)):
            return f"marker rows {rows}, expected 1..{case.rows}"
        amcheck = run_as_postgres(
            ["pg_amcheck", "--all", "--install-missing", *server._client_args()], check=False
        )
        if amcheck.returncode != 0:
            return f"pg_amcheck: {amcheck.stdout}{amcheck.stderr}"
        server.stop()
        checksums = run_as_postgres(
            ["pg_checksums", "--check", "-D", str(server.data_dir)], check=False
        )
        if checksums.returncode != 0:
            return f"pg_checksums: {checksums.stdout}{checksums.stderr}"
        return None
    except (AssertionError, ServerError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if restored is not None:
            try:
                restored.server.stop("immediate")
            except ServerError:
                restored.server.kill()


def test_restore_drill(
    pg: PostgresServer,
    nats_server: Any,
    tier1_dir: Path,
    keyring_files: dict[str, Path],
    klio_config: Any,
    workdir: Path,
) -> None:
    config = klio_config(pg=pg, nats=nats_server, tier1=tier1_dir, keys=keyring_files)
    settings = load(config)
    marks: dict[int, Mark] = {}
    pg.execute("CREATE TABLE marker (id int PRIMARY KEY)")
    with receiver_inprocess(settings), basebackup_inprocess(settings):
        wait_ready(settings, "basebackup")
        pg.pgbench_init(scale=5)
        load_run = threading.Thread(target=pg.pgbench, args=(2,), kwargs={"seconds": 6})
        load_run.start()
        for row in (1, 2, 3):
            marks[row] = mark(pg, row)
        first = backup_now(config, settings)  # in the middle of the load
        for row in range(4, 13):
            marks[row] = mark(pg, row)
        load_run.join(120)
        second = backup_now(config, settings)
        for row in (13, 14):
            marks[row] = mark(pg, row)
        pg.execute("SELECT pg_create_restore_point('klio_drill')")
        for row in (15, 16):
            marks[row] = mark(pg, row)
        close_segment(pg, settings)

    cases = [
        Case(
            "time",
            ("--target-time", marks[5].after_time),
            5,
            first.id,
            "recovery stopping before commit",
        ),
        Case(
            "lsn",
            ("--target-lsn", marks[7].after_lsn),
            7,
            first.id,
            "recovery stopping after WAL location (LSN)",
        ),
        Case(
            "xid",
            ("--target-xid", str(marks[9].xid), "--backup", first.id),
            9,
            first.id,
            f"recovery stopping after commit of transaction {marks[9].xid}",
        ),
        Case(
            "name",
            ("--target-name", "klio_drill"),
            14,
            second.id,
            'recovery stopping at restore point "klio_drill"',
        ),
        Case(
            "immediate",
            ("--target-immediate", "--backup", "latest"),
            12,
            second.id,
            "recovery stopping after reaching consistency",
        ),
        Case("end", (), 16, second.id, None),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        verified = pool.submit(klio, config, "verify", "--backup", first.id, "--json")
        results = list(pool.map(lambda c: (c.name, run_case(workdir, config, c)), cases))
    failures = [f"{name}: {problem}" for name, problem in results if problem is not None]
    check = json.loads(verified.result().stdout)
    if not check["ok"] or check["backup_manifest_files"] != check["files"] - 1:
        failures.append(f"klio verify of {first.id}: {check}")
    assert not failures, "\n\n".join(failures)
