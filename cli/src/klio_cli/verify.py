"""``klio verify``: re-read and check every object of a backup and its WAL range."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from klio_restore.backupverify import VerifyReport


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``verify`` to the parser."""
    from klio_cli.restore import add_tier, positive

    p = commands.add_parser(
        "verify",
        help="re-read every chunk of a backup, its backup_manifest and its WAL range",
        description="Decrypt and check every chunk of a backup, rebuild each file's checksum "
        "and compare it with the backup's manifest and PostgreSQL's backup_manifest, and decode "
        "every WAL segment from the backup's start to its end. Problems are reported by file; "
        "the exit status is 1 if there is any.",
    )
    p.add_argument("--backup", metavar="ID", help="backup id (default: the newest)")
    add_tier(p)
    p.add_argument("--jobs", type=positive, default=4, metavar="N", help="files checked at once")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=verify_command)


def verify_command(ns: argparse.Namespace) -> int:
    """Run ``klio verify``; exit 1 on any problem."""
    from klio_cli import output
    from klio_cli.restore import ProgressBar, context
    from klio_restore.backupverify import verify_backup

    ctx = context(ns)
    bar = ProgressBar("verifying")
    try:
        report = verify_backup(ctx, ns.backup, jobs=ns.jobs, progress=None if ns.json else bar)
    finally:
        bar.close()
    if ns.json:
        output.json_document(report.document())
    else:
        print_report(report)
    return 0 if report.ok else 1


def print_report(report: VerifyReport) -> None:
    """The text form: what was checked, one line per problem, the result."""
    from klio_cli import output

    backup = report.backup
    print(
        f"backup {backup.id}: {output.plural(report.files, 'file')}, "
        f"{output.size(report.bytes)} in {output.plural(report.chunks, 'chunk')} checked; "
        f"backup_manifest lists {output.plural(report.pg_manifest_files, 'file')}"
    )
    print(
        f"WAL {backup.wal_start_segment} .. {backup.wal_end_segment}: "
        f"{output.plural(report.wal_files, 'file')} decoded"
    )
    for problem in report.problems:
        print(f"{problem.file}: {problem.reason}")
    if report.ok:
        print("result: ok")
    else:
        print(f"result: FAIL ({output.plural(len(report.problems), 'problem')})")
