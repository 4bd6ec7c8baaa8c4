"""``klio wal-restore``, ``klio wal status`` and ``klio wal verify``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from klio_restore.context import ClusterContext
    from klio_restore.walverify import ArchiveReport

STALE_AFTER = 3 * 10.0
"""A status older than three receiver status intervals (10 s) is stale."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``wal-restore`` and ``wal {status,verify}`` to the parser."""
    restore = commands.add_parser(
        "wal-restore",
        help="restore_command: fetch one WAL or history file (%%f %%p)",
        description="Fetch one archived WAL segment or history file to DEST, from Tier 1 or, "
        "when Tier 1 lacks it or its copy is corrupt, from the bucket. Exit status: 0 "
        "restored, 1 in neither tier, 150 cannot be delivered (corrupt, key, configuration): "
        "PostgreSQL stops recovery instead of promoting early.",
    )
    restore.add_argument("name", metavar="NAME", help="file name (%%f)")
    restore.add_argument("dest", metavar="DEST", help="destination path (%%p)")
    restore.add_argument(
        "--prefetch",
        metavar="K",
        type=_depth,
        default=8,
        help="decode the next K segments ahead into a spool beside DEST (default 8, 0: off)",
    )
    restore.set_defaults(func=_restore_command)

    wal = commands.add_parser("wal", help="the WAL archive").add_subparsers(
        dest="wal_command", metavar="COMMAND", required=True
    )
    status = wal.add_parser("status", help="receiver state, LSNs, lag, archive counts")
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.set_defaults(func=status_command)
    verify = wal.add_parser("verify", help="continuity of the archive; every object decodes")
    verify.add_argument("--json", action="store_true", help="print one JSON document")
    verify.add_argument("--quick", action="store_true", help="check names only, decode nothing")
    verify.set_defaults(func=verify_command)


def wal_restore(config: str | None, cluster: str | None, name: str, dest: str) -> int:
    """Run ``klio wal-restore NAME DEST`` and return its exit status (see klio_restore.walfetch)."""
    from klio_cli import output
    from klio_common import fsio
    from klio_common.errors import KlioError
    from klio_restore import walfetch
    from klio_restore.context import load_settings, open_cluster

    try:
        ctx = open_cluster(load_settings(Path(config) if config else None, os.environ), cluster)
        chain = walfetch.sources(
            ctx.tier1,
            ctx.keyring,
            ctx.bucket_wal if ctx.has_tier2 else None,
            log=lambda line: print(f"klio: {line}", file=sys.stderr),
        )
        if walfetch.fetch(name, Path(dest), chain):
            return walfetch.EXIT_RESTORED
    except KlioError as exc:
        output.klio_error(exc)
        return walfetch.EXIT_FATAL
    except OSError as exc:
        if exc.errno in fsio.NO_SPACE:
            output.error(
                f"no space left on device writing {dest}: {exc.strerror}",
                "free space on that volume (pg_wal); recovery stopped, and goes on where it "
                "was when the server starts again",
            )
            return walfetch.EXIT_FATAL
        output.os_error(exc)
        print(
            "HINT: the PostgreSQL server's OS user must be able to read the configuration, "
            "the key files and the Tier-1 archive, and write to the destination",
            file=sys.stderr,
        )
        return walfetch.EXIT_FATAL
    except Exception as exc:  # anything unexpected must stop recovery, not end it early
        output.error(f"unexpected failure restoring {name}: {exc!r}")
        return walfetch.EXIT_FATAL
    print(f"klio: {name} is not in the archive", file=sys.stderr)
    return walfetch.EXIT_MISSING


def _restore_command(ns: argparse.Namespace) -> int:
    from klio_restore import spool

    config, cluster, depth = ns.config, ns.cluster, ns.prefetch
    if spool.serve(ns.name, ns.dest, config=config, cluster=cluster, depth=depth):
        return 0
    status = wal_restore(config, cluster, ns.name, ns.dest)
    if status == 0:
        spool.follow(ns.name, ns.dest, config=config, cluster=cluster, depth=depth)
    return status


def _depth(text: str) -> int:
    import argparse

    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a number of segments, 0 or more, not {text!r}")
    return int(text)


def _context(ns: argparse.Namespace) -> ClusterContext:
    from klio_restore.context import load_settings, open_cluster

    config = Path(ns.config) if ns.config else None
    return open_cluster(load_settings(config, os.environ), ns.cluster)


# -- status -----------------------------------------------------------------------------------


def status_command(ns: argparse.Namespace, now: float | None = None) -> int:
    """``klio wal status``: what the wal-receiver last reported, and the archive's size."""
    import time

    from klio_cli import output
    from klio_common.errors import NotFound

    ctx = _context(ns)
    archive = ctx.archive
    if not archive.cluster_dir.is_dir():
        raise NotFound(
            f"no WAL archive for cluster '{archive.cluster}' at {archive.cluster_dir}",
            hint="check tier1.path and --cluster; the wal-receiver creates the archive",
        )
    status = archive.read_status() or {}
    updated = status.get("updated_at")
    age = None if updated is None else max(0.0, (now or time.time()) - float(updated))
    doc: dict[str, Any] = {
        "cluster": archive.cluster,
        "state": status.get("state", "unknown"),
        "stale": age is None or age > STALE_AFTER,
        "status_age_seconds": None if age is None else round(age, 1),
    }
    for key in (
        "slot",
        "server_timeline",
        "received_lsn",
        "flushed_lsn",
        "server_lsn",
        "lag_bytes",
        "lag_seconds",
        "last_closed_segment",
        "segments_closed",
        "synchronous",
        "turn",
        "last_error",
        "updated_at",
    ):
        doc[key] = status.get(key)
    doc["archive"] = archive_summary(ctx)
    if ns.json:
        output.json_document(doc)
        return 0
    _print_status(doc)
    return 0


def archive_summary(ctx: ClusterContext) -> dict[str, Any]:
    """Counts and size on disk of a cluster's WAL archive (names only, nothing decoded)."""
    archive = ctx.archive
    segments: list[str] = []
    partials: list[str] = []
    size = 0
    for name, path in archive.iter_segment_files():
        (partials if name.endswith(".partial") else segments).append(name)
        size += _size(path)
    histories = archive.list_history()
    for tli in histories:
        size += _size(archive.history_path(tli))
    if archive.open_dir.is_dir():
        size += sum(_size(Path(e.path)) for e in os.scandir(archive.open_dir) if e.is_file())
    timelines = sorted({int(n[:8], 16) for n in segments + partials} | set(histories))
    segments.sort(key=lambda n: (n[8:], n[:8]))
    return {
        "segments": len(segments),
        "partials": len(partials),
        "histories": len(histories),
        "timelines": timelines,
        "size_bytes": size,
        "oldest_segment": segments[0] if segments else None,
        "newest_segment": segments[-1] if segments else None,
    }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed by retention while we looked
        return 0


def _print_status(doc: dict[str, Any]) -> None:
    from klio_cli import output

    def show(value: Any) -> str:
        return "-" if value is None or value == "" else str(value)

    age = doc["status_age_seconds"]
    if age is None:
        state = f"{doc['state']} (no status from the wal-receiver yet)"
    elif doc["stale"]:
        state = f"stale: last reported {doc['state']} {age:.0f} s ago (receiver not running?)"
    else:
        state = f"{doc['state']} (updated {age:.0f} s ago)"
    lag = "-"
    if doc["lag_bytes"] is not None:
        lag = output.size(int(doc["lag_bytes"]))
        if doc["lag_seconds"] is not None:
            lag += f", {float(doc['lag_seconds']):.1f} s"
    arch = doc["archive"]
    turn = doc["turn"]  # a synchronous standby's loop: native or python
    output.table(
        [
            ("cluster", doc["cluster"]),
            ("receiver", state),
            ("slot", show(doc["slot"])),
            ("synchronous", show(doc["synchronous"]) + (f", {turn} turn" if turn else "")),
            ("server timeline", show(doc["server_timeline"])),
            ("server LSN", show(doc["server_lsn"])),
            ("received LSN", show(doc["received_lsn"])),
            ("flushed LSN", show(doc["flushed_lsn"])),
            ("lag", lag),
            ("last closed segment", show(doc["last_closed_segment"])),
            ("segments closed", show(doc["segments_closed"])),
            ("last error", show(doc["last_error"])),
            (
                "archive",
                f"{output.plural(arch['segments'], 'segment')}, "
                f"{output.plural(arch['partials'], 'partial')}, "
                f"{output.plural(arch['histories'], 'history file')}, "
                f"{output.size(arch['size_bytes'])} on disk",
            ),
            ("timelines", ", ".join(map(str, arch["timelines"])) or "-"),
            ("oldest segment", show(arch["oldest_segment"])),
            ("newest segment", show(arch["newest_segment"])),
        ]
    )


# -- verify -----------------------------------------------------------------------------------


def verify_command(ns: argparse.Namespace) -> int:
    """``klio wal verify``: gaps, missing history files and damaged objects; exit 1 on any."""
    from klio_cli import output
    from klio_restore.walverify import verify_archive

    ctx = _context(ns)
    report = verify_archive(ctx.archive, ctx.keyring, quick=ns.quick)
    doc = verify_document(ctx.archive.cluster, report)
    if ns.json:
        output.json_document(doc)
    else:
        _print_verify(doc, quick=ns.quick)
    return 0 if report.ok else 1


def verify_document(cluster: str, report: ArchiveReport) -> dict[str, Any]:
    """The ``--json`` form of a verify report."""
    from klio_common.pg.walname import history_name

    cont = report.continuity
    return {
        "cluster": cluster,
        "ok": report.ok,
        "target_timeline": cont.target_timeline,
        "first_segment": cont.first.name if cont.first else None,
        "last_segment": cont.last.name if cont.last else None,
        "timelines": [{"timeline": s.timeline, "begin_segno": s.begin_segno} for s in cont.path],
        "segments": report.segments,
        "partials": report.partials,
        "histories": report.histories,
        "decoded": report.decoded,
        "gaps": [
            {
                "timeline": g.timeline,
                "first_segment": g.first.name,
                "last_segment": g.last.name,
                "count": g.count,
                "start_lsn": str(g.start_lsn),
                "end_lsn": str(g.end_lsn),
            }
            for g in cont.gaps
        ],
        "missing_histories": [history_name(t) for t in cont.missing_histories],
        "damaged": [{"name": d.name, "reason": d.reason} for d in report.damaged],
        "off_path": [s.name for s in cont.off_path],
    }


def _print_verify(doc: dict[str, Any], *, quick: bool) -> None:
    from klio_cli import output

    first, last = doc["first_segment"], doc["last_segment"]
    span = f"{first} .. {last}" if first else "no complete segment archived yet"
    print(f"archive of cluster '{doc['cluster']}': {span} (timeline {doc['target_timeline']})")
    checked = (
        f"{output.plural(doc['segments'], 'segment')}, {output.plural(doc['partials'], 'partial')}"
        f", {output.plural(doc['histories'], 'history file')}"
    )
    how = "names only (--quick)" if quick else f"{output.plural(doc['decoded'], 'object')} decoded"
    print(f"checked: {checked}; {how}")
    for gap in doc["gaps"]:
        print(
            f"gap on timeline {gap['timeline']}: {gap['first_segment']} .. {gap['last_segment']} "
            f"({output.plural(gap['count'], 'segment')} missing, "
            f"LSN {gap['start_lsn']} to {gap['end_lsn']})"
        )
    for name in doc["missing_histories"]:
        print(f"missing history file: {name}")
    for bad in doc["damaged"]:
        print(f"damaged: {bad['name']}: {bad['reason']}")
    if doc["off_path"]:
        print(
            f"note: {output.plural(len(doc['off_path']), 'segment')} not on the path to timeline "
            f"{doc['target_timeline']} (never replayed): {', '.join(doc['off_path'][:5])}"
            + (" ..." if len(doc["off_path"]) > 5 else "")
        )
    problems = len(doc["gaps"]) + len(doc["missing_histories"]) + len(doc["damaged"])
    print("result: ok" if not problems else f"result: FAIL ({output.plural(problems, 'problem')})")
