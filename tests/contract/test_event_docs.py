"""The published event documentation (docs/events.md, docs/events/*.json) is up to date."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klio_common.events import ALL_EVENTS, tag_of
from klio_common.events.codec import decode_strict, encode
from klio_common.events.schema import examples, json_schema, main, render

DOCS = Path(__file__).resolve().parents[2] / "docs"
REGENERATE = "run: .venv/bin/python -m klio_common.events.schema docs/events"


def test_committed_schemas_are_current() -> None:
    expected = render()
    committed = {p.name for p in (DOCS / "events").glob("*.json")}
    assert committed == {name for name in expected if name.endswith(".json")}, REGENERATE
    for name, text in expected.items():
        path = DOCS / name if name == "events.md" else DOCS / "events" / name
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale; {REGENERATE}"


def test_one_schema_and_example_per_event() -> None:
    assert [type(e) for e in examples()] == list(ALL_EVENTS)
    files = render()
    for cls in ALL_EVENTS:
        schema = json.loads(files[f"{tag_of(cls)}.json"])
        assert schema["properties"]["type"] == {"enum": [tag_of(cls)]}
        assert "type" in schema["required"]
        assert schema["description"] and "    " not in schema["description"]
        assert f"## `{tag_of(cls)}`" in files["events.md"]


def test_examples_obey_the_strict_contract() -> None:
    for event in examples():
        assert decode_strict(encode(event)) == event


def test_every_field_is_documented() -> None:
    for cls in ALL_EVENTS:
        for name, prop in json_schema(cls)["properties"].items():
            assert name == "type" or prop.get("description"), f"{cls.__name__}.{name}"


def test_generator_writes_files_and_drops_stale_schemas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "events"
    out.mkdir()
    (out / "wal.segment.removed.json").write_text("{}")
    assert main([str(out)]) == 0
    assert not (out / "wal.segment.removed.json").exists()
    assert (tmp_path / "events.md").read_text(encoding="utf-8") == render()["events.md"]
    assert len(list(out.glob("*.json"))) == len(ALL_EVENTS)
    assert "events.md" in capsys.readouterr().out
