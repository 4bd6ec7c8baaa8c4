"""``klio retention plan|apply``: what the policies delete, and deleting it now.

The run is ``klio-retention`` itself, started once: the command line tool imports no service, and
the deletions on demand are the same code the service runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``retention`` to the parser."""
    p = commands.add_parser(
        "retention",
        help="show or apply the retention policies",
        description="Show what each tier's retention policy deletes (plan) or delete it now "
        "(apply): expired backups, the WAL only they needed and the chunks no kept backup "
        "references. Data not yet on Tier 2 and objects under object lock are held, with the "
        "reason.",
    )
    sub = p.add_subparsers(dest="retention_command", metavar="COMMAND", required=True)
    for name, text in (
        ("plan", "list what would be deleted and why; delete nothing"),
        ("apply", "delete what the policy expires now; return when done"),
    ):
        q = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        q.add_argument("--tier", type=int, choices=[1, 2], help="one tier (default: each)")
        q.add_argument("--json", action="store_true", help="print one JSON document")
        q.set_defaults(func=retention_command)


def executable() -> str:
    """The ``klio-retention`` beside this interpreter (the same installation), else on PATH."""
    beside = Path(sys.executable).parent / "klio-retention"
    if beside.exists():
        return str(beside)
    return shutil.which("klio-retention") or str(beside)


def retention_command(ns: argparse.Namespace) -> int:
    """Run ``klio-retention`` once and print its result."""
    from klio_cli import output

    argv = [executable()]
    if ns.config:
        argv += ["--config", ns.config]
    if ns.cluster:
        argv += ["--cluster", ns.cluster]
    argv.append(ns.retention_command)
    if ns.tier:
        argv += ["--tier", str(ns.tier)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        return done.returncode
    docs: list[dict[str, Any]] = json.loads(done.stdout)
    if ns.json:
        output.json_document(docs)
    elif ns.retention_command == "plan":
        for doc in docs:
            print_plan(doc)
    else:
        for doc in docs:
            print_outcome(doc)
    return 0


def print_plan(doc: dict[str, Any]) -> None:
    """The text form of one tier's plan: a line per backup, then WAL, chunks and holds."""
    from klio_cli import output

    print(f"tier {doc['tier']}: {doc['policy']} (minimum redundancy {doc['minimum_redundancy']})")
    if doc["window_start"]:
        print(f"  window starts {doc['window_start']}")
    for backup in doc["backups"]:
        print(
            f"  {backup['action']:<6} {backup['id']}  ends {backup['end_time']}: {backup['reason']}"
        )
    for leftover in doc["leftovers"]:
        print(f"  remove {leftover}: unfinished backup directory")
    wal = doc["wal"]
    if wal["count"]:
        print(
            f"  WAL: delete {output.plural(wal['count'], 'file')} ({output.size(wal['bytes'])}), "
            f"{wal['first']} .. {wal['last']}"
        )
    chain = doc["wal_chain_start"]
    if chain:
        print(f"  WAL from timeline {chain['timeline']} at {chain['lsn']} is kept")
    chunks = doc["chunks"]
    print(f"  chunks: delete {chunks['count']} ({output.size(chunks['bytes'])})")
    for held in doc["held"]:
        print(f"  held {held['path']}: {held['reason']}")
    for reason, count in doc["chunks_held"].items():
        print(f"  held {output.plural(count, 'chunk')}: {reason}")
    print(f"  frees {output.size(doc['bytes'])}")


def print_outcome(doc: dict[str, Any]) -> None:
    """The text form of one tier's run."""
    from klio_cli import output

    expired = ", ".join(doc["expired"]) or "none"
    print(f"tier {doc['tier']}: {doc['policy']}: expired {expired}")
    print(
        f"  deleted {output.plural(doc['wal_deleted'], 'WAL file')} and "
        f"{output.plural(doc['chunks_deleted'], 'chunk')}; freed {output.size(doc['bytes_freed'])}"
    )
    for refused in doc["refused"]:
        print(f"  kept {refused['path']}: {refused['reason']}")
    for held in doc["held"]:
        print(f"  held {held['path']}: {held['reason']}")
