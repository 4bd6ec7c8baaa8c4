"""``klio events tail``: print Klio's events as they arrive."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse
    import asyncio

    from klio_common.runtime.settings import Settings

ENVELOPE = ("type", "schema", "event_id", "occurred_at", "cluster", "system_id")
"""Fields every event has; the text form shows the time and the rest of the fields."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``events tail`` to the parser."""
    events = commands.add_parser("events", help="Klio's events").add_subparsers(
        dest="events_command", metavar="COMMAND", required=True
    )
    tail = events.add_parser(
        "tail",
        help="print events as they arrive (Ctrl-C to stop)",
        description="Print each event of the cluster (klio.<cluster>.>) as it arrives.",
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--all-clusters", action="store_true", help="every cluster's events (klio.>)")
    tail.add_argument(
        "--from-start", action="store_true", help="replay the stream from its beginning first"
    )
    tail.set_defaults(func=tail_command)


def tail_command(ns: argparse.Namespace) -> int:
    """Run ``klio events tail`` until Ctrl-C (exit 0) or SIGTERM."""
    import asyncio

    from klio_common.events.subjects import PREFIX, cluster_subjects
    from klio_restore.context import load_settings, pick_cluster

    settings = load_settings(Path(ns.config) if ns.config else None, os.environ)
    if ns.all_clusters:
        subject = f"{PREFIX}.>"
    else:
        subject = cluster_subjects(pick_cluster(settings, ns.cluster).name)
    try:
        asyncio.run(tail(settings, subject, as_json=ns.json, from_start=ns.from_start))
    except KeyboardInterrupt:  # Ctrl-C before the handler was installed
        pass
    return 0


async def tail(
    settings: Settings,
    subject: str,
    *,
    as_json: bool,
    from_start: bool,
    stop: asyncio.Event | None = None,
) -> None:
    """Print events on ``subject`` until ``stop`` is set (by SIGINT/SIGTERM when not given).

    An ordered JetStream consumer delivers the stream's events once each and in order, from the
    beginning with ``from_start``, else from now on.
    """
    import asyncio
    import signal

    import nats.errors
    from nats.js.api import DeliverPolicy

    from klio_common.events.subjects import STREAM
    from klio_common.runtime.bus import Bus

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    bus = await Bus.connect(settings.nats, name="events-tail", reconnect=True)
    try:
        sub = await bus.jetstream.subscribe(
            subject,
            stream=STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW,
        )
        while not stop.is_set():
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
            print_event(msg.subject, msg.data, as_json=as_json)
        await sub.unsubscribe()
    finally:
        await bus.close()


def print_event(subject: str, data: bytes, *, as_json: bool) -> None:
    """Print one event: a JSON line, or ``time subject key=value ...``."""
    import json

    from klio_cli import output

    try:
        payload: Any = json.loads(data)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        text = data.decode(errors="replace")
        if as_json:
            output.json_line({"subject": subject, "malformed": text})
        else:
            print(f"- {subject} (malformed) {text}", flush=True)
        return
    if as_json:
        output.json_line({"subject": subject, "event": payload})
        return
    fields = " ".join(f"{k}={_short(v)}" for k, v in payload.items() if k not in ENVELOPE)
    print(f"{payload.get('occurred_at', '-')} {subject} {fields}".rstrip(), flush=True)


def _short(value: Any) -> str:
    text = str(value) if not isinstance(value, str) else value
    if " " in text:
        text = repr(text)
    return text if len(text) <= 80 else text[:77] + "..."
