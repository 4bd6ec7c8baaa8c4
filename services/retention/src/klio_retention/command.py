"""One retention run on demand: ``klio-retention [--config F] [--cluster C] plan|apply [--tier N]``.

It prints one JSON array (a document per tier) for ``klio retention``, which runs it: the command
line tool never imports a service, and this way the run on demand is the service's own code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from klio_common.errors import ConfigError, KlioError, NotFound
from klio_common.runtime.bus import Bus
from klio_common.runtime.settings import Settings
from klio_common.storage.s3 import S3Store
from klio_retention.cluster import ClusterSetup
from klio_retention.reaper import Reaper
from klio_retention.service import build_setups
from klio_retention.state import RetentionMetrics

COMMANDS = ("plan", "apply")
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klio-retention", description="Plan or apply retention once and print JSON."
    )
    parser.add_argument("--config", type=Path, help="YAML configuration (default: $KLIO_CONFIG)")
    parser.add_argument("--cluster", help="the cluster (optional with one cluster)")
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--tier", type=int, choices=[1, 2], help="one tier (default: each)")
    return parser


def _error(exc: KlioError) -> None:
    print(f"klio-retention: error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"HINT: {exc.hint}", file=sys.stderr)


def run_command(argv: Sequence[str]) -> int:
    """Parse ``argv``, run, print the JSON; return the exit status (2: configuration)."""
    args = _parser().parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING, format="klio-retention: %(message)s")
    try:
        settings = Settings.load(args.config, os.environ)
        return asyncio.run(_run(settings, args))
    except ConfigError as exc:
        _error(exc)
        return EXIT_CONFIG
    except KlioError as exc:
        _error(exc)
        return EXIT_FAILED


def pick(setups: dict[str, ClusterSetup], name: str | None) -> ClusterSetup:
    """The cluster named ``name``, or the only one.

    Raises:
        NotFound: no such cluster, or several and no name.
    """
    known = ", ".join(sorted(setups)) or "none"
    if name is None and len(setups) == 1:
        return next(iter(setups.values()))
    if name is None:
        raise NotFound(
            f"{len(setups)} clusters are configured and no --cluster was given",
            hint=f"pass --cluster NAME (one of: {known})",
        )
    if name not in setups:
        raise NotFound(f"unknown cluster '{name}'", hint=f"configured clusters: {known}")
    return setups[name]


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    store = S3Store(settings.tier2.s3) if settings.tier2 is not None else None
    try:
        setup = pick(build_setups(settings, RetentionMetrics(), store), args.cluster)
        tiers = [args.tier] if args.tier else sorted(setup.policies)
        for tier in tiers or [1]:
            if tier not in setup.policies:
                raise NotFound(
                    f"cluster '{setup.name}' has no retention policy for tier {tier}",
                    hint=f"set clusters[{setup.name}].retention.tier{tier}, e.g. "
                    "'RECOVERY WINDOW OF 7 DAYS'",
                )
        reaper = Reaper(setup)
        now = datetime.now(UTC)
        docs: list[dict[str, Any]] = []
        for tier in tiers:
            if args.command == "plan":
                docs.append((await reaper.plan(tier, now)).document())
            else:
                docs.append((await reaper.apply(tier, now)).document())
        if args.command == "apply":
            await _publish(settings, setup)
    finally:
        if store is not None:
            await store.close()
    print(json.dumps(docs, indent=2))
    return EXIT_OK


async def _publish(settings: Settings, setup: ClusterSetup) -> None:
    """Publish the run's events now; if NATS is away, the service publishes them later."""
    try:
        bus = await Bus.connect(settings.nats, name="klio-retention", reconnect=False)
        try:
            await bus.ensure_stream()
            await setup.outbox.drain(bus)
        finally:
            await bus.close()
    except KlioError as exc:
        pending = len(setup.outbox.pending())
        print(
            f"klio-retention: {pending} event(s) wait in {setup.outbox.directory} until "
            f"klio-retention publishes them: {exc.message}",
            file=sys.stderr,
        )
