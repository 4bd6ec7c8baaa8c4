"""Published documentation of the events: one JSON schema per subject and ``docs/events.md``.

Run ``python -m klio_common.events.schema docs/events`` after changing an event; a test fails
while the committed files are stale.
"""

from __future__ import annotations

import argparse
import inspect
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from klio_common.events import (
    BackupDone,
    BackupFailed,
    BackupRequested,
    BackupStarted,
    DeadLetter,
    Event,
    RetentionBackupExpired,
    RetentionWalPruned,
    Tier2BackupRelayed,
    Tier2WalRelayed,
    WalGapDetected,
    WalHistoryArchived,
    WalSegmentClosed,
)
from klio_common.events.base import tag_of
from klio_common.events.codec import encode, event_id_for
from klio_common.events.subjects import STREAM, STREAM_SUBJECTS

PUBLISHERS: dict[str, str] = {
    "wal.segment.closed": "wal-receiver",
    "wal.history.archived": "wal-receiver",
    "wal.gap.detected": "wal-receiver",
    "backup.requested": "the `klio` command (`klio backup run`)",
    "backup.started": "basebackup",
    "backup.done": "basebackup",
    "backup.failed": "basebackup",
    "tier2.wal.relayed": "relay",
    "tier2.backup.relayed": "relay",
    "retention.backup.expired": "retention",
    "retention.wal.pruned": "retention",
    "deadletter": "the runtime of whichever service consumed the message",
}

_SHA = "9f2c4e1b7a3d5f6e8c0b1a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f"
_T = datetime(2025, 3, 14, 3, 0, 7, 250000, tzinfo=UTC)


def _envelope(tag: str, *parts: str) -> dict[str, Any]:
    return {
        "event_id": event_id_for(tag, "main", *parts),
        "occurred_at": _T,
        "cluster": "main",
        "system_id": "7412345678901234567",
    }


def examples() -> list[Event]:
    """One realistic example of every event, in the order of ``ALL_EVENTS``."""
    seg = "00000002000000160000002B"
    return [
        WalSegmentClosed(
            **_envelope("wal.segment.closed", seg, _SHA),
            segment=seg,
            timeline=2,
            start_lsn="16/2B000000",
            end_lsn="16/2C000000",
            size=16777216,
            stored_size=2411822,
            sha256=_SHA,
            key_id="k1",
            compression="zstd",
            path=f"wal/0000000200000016/{seg}",
        ),
        WalHistoryArchived(
            **_envelope("wal.history.archived", "00000002.history", _SHA),
            segment="00000002.history",
            timeline=2,
            size=42,
            stored_size=187,
            sha256=_SHA,
            key_id="k1",
            path="wal/history/00000002.history",
        ),
        WalGapDetected(
            **_envelope("wal.gap.detected", "1", "16/29000000"),
            timeline=1,
            from_lsn="16/29000000",
            to_lsn="16/2A0000A0",
            reason="requested WAL segment 00000001000000160000002A has already been removed",
        ),
        BackupRequested(
            **_envelope("backup.requested", "3f1d"),
            request_id="3f1d0c5e9b8a4f7d",
            requested_by="alice@ops-laptop",
        ),
        BackupStarted(
            **_envelope("backup.started", "20250314T030007Z"),
            backup_id="20250314T030007Z",
            request_id="3f1d0c5e9b8a4f7d",
            timeline=2,
            start_lsn="16/2B000028",
        ),
        BackupDone(
            **_envelope("backup.done", "20250314T030007Z"),
            backup_id="20250314T030007Z",
            timeline=2,
            start_lsn="16/2B000028",
            end_lsn="16/2D000100",
            start_time=datetime(2025, 3, 14, 3, 0, 7, tzinfo=UTC),
            end_time=datetime(2025, 3, 14, 3, 4, 51, tzinfo=UTC),
            size=1276313600,
            stored_size=71303168,
            new_chunk_bytes=4194304,
            chunks_total=1218,
            chunks_new=4,
        ),
        BackupFailed(
            **_envelope("backup.failed", "20250315T030000Z"),
            backup_id="20250315T030000Z",
            reason="connection to the primary was lost during BASE_BACKUP",
        ),
        Tier2WalRelayed(
            **_envelope("tier2.wal.relayed", seg, _SHA),
            segment=seg,
            key=f"prod/main/wal/0000000200000016/{seg}",
            sha256=_SHA,
            size=16777216,
        ),
        Tier2BackupRelayed(
            **_envelope("tier2.backup.relayed", "20250314T030007Z"),
            backup_id="20250314T030007Z",
            objects_uploaded=6,
            objects_skipped=1214,
            bytes_uploaded=4325376,
        ),
        RetentionBackupExpired(
            **_envelope("retention.backup.expired", "20250301T030004Z", "1"),
            backup_id="20250301T030004Z",
            tier=1,
            reason="outside RECOVERY WINDOW OF 7 DAYS",
        ),
        RetentionWalPruned(
            **_envelope("retention.wal.pruned", "1", "000000010000001500000000"),
            tier=1,
            timeline=1,
            first_segment="000000010000001500000000",
            last_segment="00000001000000150000007F",
            count=128,
            bytes=301989888,
        ),
        DeadLetter(
            **_envelope("deadletter", "relay", "wal.segment.closed"),
            service="relay",
            subject="klio.main.wal.segment.closed",
            reason="malformed event on klio.main.wal.segment.closed: Object missing required "
            "field `sha256`",
            payload='{"type":"wal.segment.closed","segment":"00000002000000160000002B"}',
        ),
    ]


def _pretty(data: bytes) -> str:
    return msgspec.json.format(data, indent=2).decode() + "\n"


def json_schema(cls: type[Event]) -> dict[str, Any]:
    """The JSON schema of one event, standalone (draft 2020-12)."""
    raw = msgspec.json.schema(cls)
    defs: dict[str, Any] = raw["$defs"]
    body = dict(defs.pop(cls.__name__))
    body["description"] = inspect.cleandoc(body.get("description", ""))
    out: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    out.update(body)
    if defs:
        out["$defs"] = defs
    return out


def _type_text(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " or ".join(_type_text(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " or ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    text = str(prop.get("type", "any"))
    if prop.get("format"):
        text += f" ({prop['format']})"
    return text


def _constraints(prop: dict[str, Any]) -> str:
    notes = []
    if "pattern" in prop:
        notes.append(f"pattern `{prop['pattern']}`")
    if "minLength" in prop or "maxLength" in prop:
        notes.append(f"length {prop.get('minLength', 0)}..{prop.get('maxLength', '')}")
    if "minimum" in prop or "maximum" in prop:
        notes.append(f"{prop.get('minimum', '')}..{prop.get('maximum', '')}")
    if "default" in prop:
        notes.append(f"default `{json.dumps(prop['default'])}`")
    return "; ".join(notes)


def _section(event: Event) -> str:
    cls = type(event)
    schema = json_schema(cls)
    tag = tag_of(cls)
    required = set(schema.get("required", []))
    lines = [
        f"## `{tag}`",
        "",
        f"Subject `klio.<cluster>.{tag}`, "
        f"published by {PUBLISHERS[tag]}. Schema: [`events/{tag}.json`](events/{tag}.json).",
        "",
        schema["description"],
        "",
        "| field | type | required | description | constraints |",
        "|---|---|---|---|---|",
    ]
    for name, prop in schema["properties"].items():
        description = prop.get("description", "the event type" if name == "type" else "")
        row = [
            f"`{name}`",
            _type_text(prop),
            "yes" if name in required else "no",
            description.replace("|", "\\|"),
            _constraints(prop).replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "```json", _pretty(encode(event)).rstrip("\n"), "```", ""]
    return "\n".join(lines)


_INTRO = f"""# Klio events

Klio's services talk only through events on NATS JetStream; the events are also a public
integration API. This page is generated by `python -m klio_common.events.schema docs/events`
from the definitions in `klio_common.events`; do not edit it by hand.

- One stream, `{STREAM}`, over `{", ".join(STREAM_SUBJECTS)}` (file storage, 2-minute duplicate
  window). Each subject is `klio.<cluster>.<type>`: `klio.main.>` shows one cluster, `klio.>` all.
- Payloads are JSON objects. `type` names the event (it equals the subject suffix) and every
  event carries the envelope fields `schema`, `event_id`, `occurred_at`, `cluster` and
  `system_id` (PostgreSQL's system identifier as a decimal string).
- `event_id` is deterministic (a hash of what makes the fact unique) and is also sent as the
  `Nats-Msg-Id` header, so a retried publish is dropped by JetStream's duplicate window.
  Delivery is at least once: consumers must be idempotent.
- Compatibility: consumers ignore fields they do not know, so new optional fields can be added
  without a new `schema` number; removing or renaming a field, or changing its meaning,
  increments `schema`.
- LSNs are text as PostgreSQL prints them (`16/B374D848`), sizes are bytes, times are UTC in
  RFC 3339.
- A message a service can never handle is terminated and reported on `klio.<cluster>.deadletter`.

| subject | published by |
|---|---|
"""


def render() -> dict[str, str]:
    """Every generated file: ``"<tag>.json"`` schemas and ``"events.md"``, name → text."""
    files: dict[str, str] = {}
    sections = []
    table = []
    for event in examples():
        tag = tag_of(event)
        body = json.dumps(json_schema(type(event)), indent=2, ensure_ascii=False) + "\n"
        files[f"{tag}.json"] = body
        table.append(f"| [`klio.<cluster>.{tag}`](#{tag.replace('.', '')}) | {PUBLISHERS[tag]} |")
        sections.append(_section(event))
    files["events.md"] = _INTRO + "\n".join(table) + "\n\n" + "\n".join(sections)
    return files


def write(directory: Path) -> list[Path]:
    """Write the schemas into ``directory`` and ``events.md`` beside it; drop stale schemas.

    Returns:
        The paths written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = render()
    written = []
    for name, text in files.items():
        path = directory.with_suffix(".md") if name == "events.md" else directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    for stale in directory.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m klio_common.events.schema DIR``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path, help="where the JSON schemas go (e.g. docs/events)")
    args = parser.parse_args(argv)
    for path in write(args.directory):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
