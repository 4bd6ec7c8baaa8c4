"""glibc's thresholds are raised once per process, unless the environment sets them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from klio_common.runtime.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD

_PROGRAM = (
    "import json; from klio_common.runtime.allocator import tune_allocator as t; "
    "first = t(); print(json.dumps([first, t() is first]))"
)


def _run(**env: str) -> tuple[dict[str, int], bool]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    first, same = json.loads(done.stdout)
    return {str(k): v for k, v in first.items()}, same


def test_both_thresholds_are_raised_once() -> None:
    assert os.confstr("CS_GNU_LIBC_VERSION"), "this machine runs glibc"
    first, same = _run()
    assert first == {"-3": MMAP_THRESHOLD, "-1": TRIM_THRESHOLD}
    assert same


def test_the_environment_wins() -> None:
    first, _ = _run(MALLOC_TRIM_THRESHOLD_="1048576")
    assert first == {"-3": MMAP_THRESHOLD}
    first, _ = _run(MALLOC_TRIM_THRESHOLD_="1048576", MALLOC_MMAP_THRESHOLD_="65536")
    assert first == {}
