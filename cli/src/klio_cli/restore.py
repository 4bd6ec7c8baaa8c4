"""``klio restore``: materialise a data directory and write its recovery settings."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from klio_restore.context import ClusterContext
    from klio_restore.restore import RestoreResult


def positive(text: str) -> int:
    """An argparse type: an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def add_tier(parser: argparse.ArgumentParser) -> None:
    """``--tier 1|2``: read the volume or the bucket."""
    parser.add_argument(
        "--tier",
        type=int,
        choices=[1, 2],
        default=None,
        help="1: Tier 1, the volume; 2: Tier 2, the bucket alone "
        "(default: 1, or 2 when only tier2 is configured)",
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``restore`` to the parser."""
    p = commands.add_parser(
        "restore",
        help="materialise a data directory from a backup, ready to recover to a target",
        description="Create PGDATA from a backup (the newest that ends before the target, or "
        "--backup), relocate tablespaces, and write recovery.signal plus the recovery settings "
        "(restore_command = klio wal-restore, the target, recovery_target_action = promote) into "
        "postgresql.auto.conf. Start PostgreSQL on it to recover. Without a target, recovery "
        "runs to the end of the WAL archive.",
    )
    p.add_argument("--pgdata", required=True, metavar="DIR", help="new or empty data directory")
    p.add_argument("--backup", metavar="ID", help="backup id, or 'latest' (default: by target)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-time", metavar="T", help="time with zone: '2026-11-24 21:38+00'")
    target.add_argument("--target-lsn", metavar="L", help="WAL position, e.g. 0/3000028")
    target.add_argument("--target-xid", metavar="X", help="transaction id (decimal)")
    target.add_argument("--target-name", metavar="N", help="restore point name")
    target.add_argument(
        "--target-immediate", action="store_true", help="stop as soon as the backup is consistent"
    )
    p.add_argument(
        "--target-timeline", metavar="TLI", help="'latest' (default), 'current' or an id"
    )
    p.add_argument(
        "--target-exclusive", action="store_true", help="stop just before the target, not after"
    )
    add_tier(p)
    p.add_argument("--jobs", type=positive, default=4, metavar="N", help="parallel fetches (4)")
    p.add_argument(
        "--tablespace-map",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="restore the tablespace originally at OLD into NEW (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON summary")
    p.set_defaults(func=restore_command)


def context(ns: argparse.Namespace) -> ClusterContext:
    """The read-path context for ``--config`` / ``--cluster``."""
    from klio_restore.context import load_settings, open_cluster

    config = Path(ns.config) if ns.config else None
    return open_cluster(
        load_settings(config, os.environ), ns.cluster, tier=getattr(ns, "tier", None)
    )


def config_path(ns: argparse.Namespace) -> Path:
    """The configuration file in use, absolute (``--config`` or ``KLIO_CONFIG``)."""
    return Path(ns.config or os.environ["KLIO_CONFIG"]).absolute()


def klio_program() -> Path:
    """The ``klio`` next to this Python (the virtual environment's, symlinks kept)."""
    return Path(os.path.abspath(sys.executable)).parent / "klio"  # noqa: PTH100


class ProgressBar:
    """A one-line progress bar on a terminal (stderr); silent otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None, *, force: bool = False) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        """Show ``done`` of ``total`` bytes (at most ten times a second)."""
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and done < total):
            return
        from klio_cli import output

        self._last = now
        share = done / total if total else 1.0
        bar = "#" * int(share * 30)
        self.stream.write(
            f"\r{self.label} [{bar:<30}] {share:4.0%} {output.size(done)} / {output.size(total)}"
        )
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """End the line."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()


def restore_command(ns: argparse.Namespace) -> int:
    """Run ``klio restore``."""
    from klio_cli import output
    from klio_common.runtime.allocator import tune_allocator
    from klio_restore.recovery import parse_target, wal_restore_command
    from klio_restore.restore import RestoreRequest, parse_tablespace_map, restore

    target = parse_target(
        time=ns.target_time,
        lsn=ns.target_lsn,
        xid=ns.target_xid,
        name=ns.target_name,
        immediate=ns.target_immediate,
        timeline=ns.target_timeline,
        exclusive=ns.target_exclusive,
    )
    mapping = parse_tablespace_map(ns.tablespace_map)
    ctx = context(ns)
    several = len(ctx.settings.clusters) > 1
    command = wal_restore_command(
        klio_program(), config_path(ns), ctx.cluster.name if several else None
    )
    request = RestoreRequest(
        pgdata=Path(ns.pgdata),
        restore_command=command,
        target=target,
        backup_id=ns.backup,
        jobs=ns.jobs,
        tablespace_map=mapping,
    )
    bar = ProgressBar("restoring")
    tune_allocator()  # chunk-sized buffers stay in the arenas (see klio_common.runtime.allocator)
    try:
        result = restore(ctx, request, progress=None if ns.json else bar)
    finally:
        bar.close()
    if ns.json:
        output.json_document(result.document())
    else:
        print_result(result)
    return 0


def print_result(result: RestoreResult) -> None:
    """The text summary of a restore."""
    from klio_cli import output

    print(
        f"restored backup {result.backup.id} into {result.pgdata}: "
        f"{output.plural(result.files, 'file')}, {output.size(result.bytes)} "
        f"in {result.seconds:.1f} s"
    )
    for oid, location in sorted(result.tablespaces.items()):
        print(f"tablespace {oid}: {location}")
    print(
        f"recovery target: {result.target.describe()}, timeline {result.target.timeline}, "
        "then promote"
    )
    print(f"next: start PostgreSQL on it as its OS user (pg_ctl -D {result.pgdata} start)")
