"""klio-basebackup: takes each configured cluster's base backups into the Tier-1 catalog."""

from __future__ import annotations

from functools import partial

from klio_basebackup.service import SERVICE
from klio_basebackup.service import main as service_main
from klio_common.runtime.lifecycle import main_entry


def main() -> None:
    """Console entry point."""
    main_entry(SERVICE, lambda settings: partial(service_main, settings))


if __name__ == "__main__":
    main()
