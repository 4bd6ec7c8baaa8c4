"""``klio check``: one line per precondition (``ok``, ``WARN``, ``FAIL``); exit 1 on a failure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from klio_restore.check import CheckResult


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check`` to the parser."""
    check = commands.add_parser(
        "check",
        help="check PostgreSQL, NATS, Tier 1, Tier 2 and the keys",
        description="Check the configuration, PostgreSQL (replication connection, version, "
        "wal_level, role, slot, system identifier), NATS and the KLIO stream, Tier 1, the "
        "Tier-2 bucket and the encryption keys. Exit status 1 when any check fails.",
    )
    check.add_argument("--json", action="store_true", help="print a JSON array of results")
    check.set_defaults(func=check_command)


def check_command(ns: argparse.Namespace) -> int:
    """Run ``klio check``."""
    import asyncio

    from klio_common.errors import ConfigError
    from klio_restore.check import config_result, fail, run_checks
    from klio_restore.context import load_settings, pick_cluster

    config = Path(ns.config) if ns.config else None
    shown = config or (Path(os.environ["KLIO_CONFIG"]) if os.environ.get("KLIO_CONFIG") else None)
    try:
        settings = load_settings(config, os.environ)
    except ConfigError as exc:
        _print(ns, [fail("config", exc.message, exc.hint)])
        return 1
    clusters = [pick_cluster(settings, ns.cluster)] if ns.cluster else list(settings.clusters)
    results = [config_result(shown)]
    if not clusters:
        results.append(fail("clusters", "no cluster is configured", "add one under clusters:"))
    results += asyncio.run(run_checks(settings, clusters))
    _print(ns, results)
    return 1 if any(r.failed for r in results) else 0


def _print(ns: argparse.Namespace, results: list[CheckResult]) -> None:
    from klio_cli import output
    from klio_restore.check import results_document

    if ns.json:
        output.json_document(results_document(results))
        return
    for r in results:
        print(f"{r.status} {r.name}: {r.detail}")
        if r.hint and r.status != "ok":
            for line in r.hint.splitlines():
                print(f"    HINT: {line}")
