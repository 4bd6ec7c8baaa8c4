"""An open segment's frames use zstd's fastest level; any zstd reader decodes them."""

from __future__ import annotations

import os

from klio_common import compression


def test_fast_zstd_round_trips_and_keeps_the_checksum() -> None:
    fast = compression.fast(compression.get("zstd", 3))
    assert fast.name == "zstd"
    data = os.urandom(700) + bytes(1500)
    frame = fast.compress(data)
    assert fast.checks_content(frame)
    assert compression.get("zstd", 1).decompress(frame, len(data)) == data
    assert compression.fast(compression.get("zstd", 9)) is fast  # one shared codec


def test_fast_none_is_none() -> None:
    none = compression.get("none")
    assert compression.fast(none) is none
