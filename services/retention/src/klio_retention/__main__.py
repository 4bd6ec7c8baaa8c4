"""klio-retention: applies each cluster's retention policy to Tier 1 and Tier 2.

``klio-retention --config FILE`` runs the service; ``klio-retention --config FILE [--cluster C]
plan|apply [--tier N]`` plans or applies once and prints JSON (what ``klio retention`` runs).
"""

from __future__ import annotations

import sys
from functools import partial

from klio_common.runtime.lifecycle import Main, main_entry
from klio_common.runtime.settings import Settings
from klio_retention.command import COMMANDS, run_command
from klio_retention.service import SERVICE, build_setups
from klio_retention.service import main as service_main
from klio_retention.state import RetentionMetrics


def _factory(settings: Settings) -> Main:
    build_setups(settings, RetentionMetrics(), None)  # refuse bad policies before starting
    return partial(service_main, settings)


def main() -> None:
    """Console entry point."""
    argv = sys.argv[1:]
    if any(arg in COMMANDS for arg in argv):
        raise SystemExit(run_command(argv))
    main_entry(SERVICE, _factory)


if __name__ == "__main__":
    main()
