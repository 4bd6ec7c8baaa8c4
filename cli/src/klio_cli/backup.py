"""``klio backup run|list|show``: ask for a backup over NATS, and read the catalog."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from klio_common.events import Event
    from klio_common.runtime.settings import Settings

START_TIMEOUT = 60.0
"""Seconds ``backup run`` waits for the basebackup service to answer with ``backup.started``."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``backup {run,list,show}`` to the parser."""
    from klio_cli.restore import add_tier

    backup = commands.add_parser("backup", help="base backups").add_subparsers(
        dest="backup_command", metavar="COMMAND", required=True
    )
    run = backup.add_parser(
        "run",
        help="ask klio-basebackup for a backup now",
        description="Publish a backup request on klio.<cluster>.backup.requested and print the "
        "id of the backup that answers it (a request while a backup runs is answered by that "
        "backup). With --wait, wait until it is done (exit 0) or failed (exit 1).",
    )
    run.add_argument("--wait", action="store_true", help="wait until the backup is done or failed")
    run.add_argument(
        "--timeout",
        type=float,
        default=START_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the backup to start ({START_TIMEOUT:.0f})",
    )
    run.add_argument("--json", action="store_true", help="print one JSON document")
    run.set_defaults(func=run_command)

    listing = backup.add_parser("list", help="committed backups and backups in progress")
    add_tier(listing)
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=list_command)

    show = backup.add_parser("show", help="one backup: figures, dedup, WAL range, tablespaces")
    show.add_argument("id", metavar="ID", help="backup id, or 'latest'")
    add_tier(show)
    show.add_argument("--json", action="store_true", help="print one JSON document")
    show.set_defaults(func=show_command)


# -- list / show --------------------------------------------------------------------------------


def list_command(ns: argparse.Namespace) -> int:
    """Run ``klio backup list``."""
    from klio_cli import output
    from klio_cli.restore import context
    from klio_restore.backups import list_documents, open_catalog

    docs = list_documents(open_catalog(context(ns)).backups)
    if ns.json:
        output.json_document(docs)
        return 0
    if not docs:
        print("no backups")
        return 0
    rows = [("ID", "STATUS", "TLI", "START LSN", "END LSN", "END TIME", "SIZE", "STORED")]
    for d in docs:
        if d["status"] == "done":
            rows.append(
                (
                    d["id"],
                    "done",
                    str(d["timeline"]),
                    d["start_lsn"],
                    d["end_lsn"],
                    str(d["end_time"])[:19].replace("T", " "),
                    output.size(d["size"]),
                    output.size(d["stored_size"]),
                )
            )
        else:
            rows.append((d["id"], d["status"], "-", "-", "-", "-", _progress(d), "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _progress(doc: dict[str, Any]) -> str:
    from klio_cli import output

    done, estimate = doc.get("bytes_done") or 0, doc.get("bytes_estimated")
    if not estimate:
        return output.size(done)
    return f"{output.size(done)} / {output.size(estimate)} ({done / estimate:.0%})"


def show_command(ns: argparse.Namespace) -> int:
    """Run ``klio backup show ID``."""
    from klio_cli import output
    from klio_cli.restore import context
    from klio_restore.backups import open_catalog, show_document

    doc = show_document(open_catalog(context(ns)).backups, ns.id)
    if ns.json:
        output.json_document(doc)
        return 0
    if doc["status"] != "done":
        output.table(
            [
                ("backup", doc["id"]),
                ("status", doc["status"] + (f" ({doc['phase']})" if doc.get("phase") else "")),
                ("started", str(doc["start_time"])),
                ("progress", _progress(doc)),
                ("host", f"{doc['host']} (pid {doc['pid']})"),
            ]
        )
        return 0
    dedup = doc["dedup"]
    rows = [
        ("backup", doc["id"]),
        ("status", "done"),
        (
            "cluster",
            f"{doc['cluster']} (system {doc['system_id']}, PostgreSQL {_version(doc)})",
        ),
        ("label", doc["label"]),
        ("timeline", str(doc["timeline"])),
        ("LSN", f"{doc['start_lsn']} .. {doc['end_lsn']}"),
        ("time", f"{doc['start_time']} .. {doc['end_time']} ({doc['duration_seconds']} s)"),
        ("WAL", f"{doc['wal']['start_segment']} .. {doc['wal']['end_segment']}"),
        ("files", f"{doc['file_count']} files, {doc['directory_count']} directories"),
        ("size", output.size(doc["size"])),
        ("stored", f"{output.size(doc['stored_size'])} (ratio {dedup['ratio']})"),
        (
            "dedup",
            f"{dedup['chunks_new']} of {dedup['chunks_total']} chunks new "
            f"({output.size(dedup['new_chunk_bytes'])} added), {dedup['chunks_reused']} reused",
        ),
        ("compression", f"{doc['compression']}, key {doc['key_id'] or 'none (unencrypted)'}"),
    ]
    rows += [
        (f"tablespace {t['oid']}", f"{t['location']} ({output.size(t['size'])})")
        for t in doc["tablespaces"]
    ]
    output.table(rows)
    return 0


def _version(doc: dict[str, Any]) -> str:
    number = int(doc["pg_version"])
    return f"{number // 10000}.{number % 10000}"


# -- run ----------------------------------------------------------------------------------------


def run_command(ns: argparse.Namespace) -> int:
    """Run ``klio backup run [--wait]``: exit 0 when started (or done), 1 when failed."""
    import asyncio

    from klio_cli import output
    from klio_cli.restore import context

    ctx = context(ns)
    ident = ctx.archive.read_identity()
    doc = asyncio.run(
        request_backup(
            ctx.settings,
            ctx.cluster.name,
            system_id=ident.system_id if ident else "0",
            wait=ns.wait,
            timeout=ns.timeout,
        )
    )
    if ns.json:
        output.json_document(doc)
    elif doc["status"] == "failed":
        output.error(f"backup {doc['backup_id']} failed: {doc['reason']}")
    else:
        print(doc["backup_id"])
    return 1 if doc["status"] == "failed" else 0


def requester() -> str:
    """``user@host`` of whoever runs the command."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


async def request_backup(
    settings: Settings, cluster: str, *, system_id: str, wait: bool, timeout: float
) -> dict[str, Any]:
    """Publish ``backup.requested`` and follow the answer.

    Subscribes (ordered consumer, new messages only) before publishing, so no answer is missed.

    Returns:
        ``{"backup_id", "request_id", "status": "running"|"done"|"failed", ...}``.

    Raises:
        Retryable: NATS cannot be reached.
        KlioError: no ``backup.started`` within ``timeout`` seconds, or no stream.
    """
    import uuid

    import nats.errors
    import nats.js.errors
    from nats.js.api import DeliverPolicy

    from klio_common.errors import KlioError, Retryable
    from klio_common.events import BackupDone, BackupFailed, BackupRequested, BackupStarted, now
    from klio_common.events.subjects import STREAM, subject
    from klio_common.runtime.bus import Bus

    request_id = str(uuid.uuid4())
    bus = await Bus.connect(settings.nats, name="klio-backup-run", reconnect=False)
    try:
        try:
            sub = await bus.jetstream.subscribe(
                f"{subject(cluster, 'backup.requested').rsplit('.', 1)[0]}.*",
                stream=STREAM,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
            )
        except nats.js.errors.NotFoundError as exc:
            raise KlioError(
                f"the JetStream stream {STREAM} does not exist on {settings.nats.url}",
                hint="start the Klio services (they create the stream), then try again",
            ) from exc
        except (nats.errors.Error, OSError) as exc:
            raise Retryable(f"cannot subscribe to backup events: {exc}") from exc
        request = BackupRequested(
            event_id=f"backup-requested-{request_id}",
            occurred_at=now(),
            cluster=cluster,
            system_id=system_id,
            request_id=request_id,
            requested_by=requester(),
        )
        await bus.publish_event(request)

        def answers(event: Event) -> bool:
            return isinstance(event, BackupStarted) and event.request_id == request_id

        try:
            started = await _next_event(sub, answers, timeout)
        except TimeoutError:
            raise KlioError(
                f"klio-basebackup did not start a backup within {timeout:.0f} s "
                f"(request {request_id})",
                hint="is klio-basebackup running for this cluster? 'klio check' and its logs "
                "tell; the request stays queued and is served when the service starts",
            ) from None
        assert isinstance(started, BackupStarted)
        doc: dict[str, Any] = {
            "backup_id": started.backup_id,
            "request_id": request_id,
            "status": "running",
            "timeline": started.timeline,
            "start_lsn": started.start_lsn,
        }
        if not wait:
            return doc

        def ends(event: Event) -> bool:
            return (
                isinstance(event, BackupDone | BackupFailed)
                and event.backup_id == started.backup_id
            )

        end = await _next_event(sub, ends, None)
        if isinstance(end, BackupFailed):
            doc.update(status="failed", reason=end.reason)
        elif isinstance(end, BackupDone):
            doc.update(
                status="done",
                end_lsn=end.end_lsn,
                size=end.size,
                stored_size=end.stored_size,
                new_chunk_bytes=end.new_chunk_bytes,
            )
        return doc
    finally:
        await bus.close()


async def _next_event(sub: Any, wanted: Any, timeout: float | None) -> Event:
    """The next event on ``sub`` for which ``wanted(event)`` holds (malformed ones skipped)."""
    import asyncio

    import nats.errors

    from klio_common.errors import KlioError
    from klio_common.events import codec

    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        left = 1.0 if deadline is None else deadline - loop.time()
        if left <= 0:
            raise TimeoutError
        try:
            msg = await sub.next_msg(timeout=min(left, 1.0))
        except nats.errors.TimeoutError:
            continue
        try:
            event = codec.decode(msg.data, subject=msg.subject)
        except KlioError:
            continue
        if wanted(event):
            return event
