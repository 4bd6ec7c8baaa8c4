"""Argument handling of the ``klio`` command (no servers, no archive)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from klio_cli.main import build_parser, fast_wal_restore, main

SEG = "000000010000000000000003"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["wal-restore", SEG, "pg_wal/RECOVERYXLOG"], (None, None, SEG, "pg_wal/RECOVERYXLOG")),
        (["--config", "/k.yaml", "wal-restore", SEG, "x"], ("/k.yaml", None, SEG, "x")),
        (
            ["--config=/k.yaml", "--cluster=db", "wal-restore", SEG, "x"],
            ("/k.yaml", "db", SEG, "x"),
        ),
        (["--cluster", "db", "--config", "c", "wal-restore", "a", "b"], ("c", "db", "a", "b")),
    ],
)
def test_fast_path_recognises_restore_command(
    argv: list[str], expected: tuple[str | None, str | None, str, str]
) -> None:
    assert fast_wal_restore(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["wal-restore", SEG],
        ["wal-restore", SEG, "x", "y"],
        ["wal-restore", "--help"],
        ["wal-restore", SEG, "-x"],
        ["--json", "wal-restore", SEG, "x"],
        ["--config"],
        ["--config", "a", "--config", "b", "wal-restore", SEG, "x"],
        ["check"],
        ["wal", "status"],
    ],
)
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert fast_wal_restore(argv) is None


def test_only_working_commands_are_listed() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == [  # type: ignore[arg-type]
        "backup",
        "check",
        "events",
        "restore",
        "retention",
        "verify",
        "wal",
        "wal-restore",
    ]
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["frobnicate"])
    assert exc.value.code == 2


def test_global_options_and_json_flags() -> None:
    parser = build_parser()
    ns = parser.parse_args(["--config", "k.yaml", "--cluster", "main", "wal", "verify", "--json"])
    assert (ns.config, ns.cluster, ns.json, ns.quick) == ("k.yaml", "main", True, False)
    ns = parser.parse_args(["events", "tail", "--all-clusters", "--from-start"])
    assert (ns.all_clusters, ns.from_start, ns.json) == (True, True, False)
    ns = parser.parse_args(["check", "--json"])
    assert ns.json is True
    ns = parser.parse_args(["wal-restore", SEG, "dest"])
    assert (ns.name, ns.dest) == (SEG, "dest")


def test_usage_errors_exit_2_with_klio_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["wal", "status", "--bogus"])
    assert exc.value.code == 2
    assert "klio: error:" in capsys.readouterr().err


def test_missing_configuration_is_an_error_with_a_hint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KLIO_CONFIG", raising=False)
    assert main(["wal", "status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("klio: error: ")
    assert "\nHINT: " in err


def test_wal_restore_without_configuration_stops_recovery(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KLIO_CONFIG", raising=False)
    assert main(["wal-restore", SEG, str(tmp_path / "x")]) == 150
    assert capsys.readouterr().out == ""
    assert list(tmp_path.iterdir()) == []


def test_wal_restore_path_imports_no_network_client() -> None:
    # restore_command runs once per segment: it must not pay for NATS, psycopg, S3 or argparse.
    code = (
        "import sys\n"
        "from klio_cli.main import main\n"
        f"main(['wal-restore', '{SEG}', '/nonexistent/x'])\n"
        "heavy = [m for m in ('argparse', 'nats', 'psycopg', 'aioboto3', 'botocore')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.stdout.strip() == "", done.stdout + done.stderr
