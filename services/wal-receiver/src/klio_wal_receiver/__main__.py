"""klio-wal-receiver: keeps each configured cluster's WAL archive on Tier 1."""

from __future__ import annotations

from functools import partial

from klio_common.runtime.lifecycle import main_entry
from klio_wal_receiver.service import SERVICE
from klio_wal_receiver.service import main as service_main


def main() -> None:
    """Console entry point."""
    main_entry(SERVICE, lambda settings: partial(service_main, settings))


if __name__ == "__main__":
    main()
