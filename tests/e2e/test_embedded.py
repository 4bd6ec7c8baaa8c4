"""`make run`'s embedded default, end to end: real processes, a real archive, live status."""

from __future__ import annotations

import subprocess
import sys


def test_embedded_default_archives_and_shows_status() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "klio_dev.embedded", "--duration", "2", "--interval", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "receiver:            streaming" in out, out
    assert "last closed segment: 0000000100000000000000" in out, out
    assert "klio: stopping" in out
