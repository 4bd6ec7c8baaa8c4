"""klio-relay: copies each configured cluster's Tier-1 directory to the bucket (Tier 2)."""

from __future__ import annotations

from functools import partial

from klio_common.runtime.lifecycle import main_entry
from klio_relay.service import SERVICE
from klio_relay.service import main as service_main


def main() -> None:
    """Console entry point."""
    main_entry(SERVICE, lambda settings: partial(service_main, settings))


if __name__ == "__main__":
    main()
