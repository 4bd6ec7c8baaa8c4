"""Free ports for the test servers: outside the range the kernel gives outgoing connections."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest

from klio_dev import ports
from klio_dev.ports import EPHEMERAL_RANGE, free_port


def _ephemeral_start() -> int:
    return int(EPHEMERAL_RANGE.read_text().split()[0])


def test_ports_come_from_below_the_ephemeral_range_and_never_twice() -> None:
    handed = [free_port() for _ in range(300)]
    assert len(set(handed)) == len(handed)
    assert all(10000 <= p < _ephemeral_start() for p in handed), handed


def test_a_port_in_use_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    below = ports._below_ephemeral()
    assert below is not None
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        monkeypatch.setattr(ports, "_turn", itertools.count(below.index(port)))
        other = free_port()
    assert other != port and other in below


def test_without_the_kernels_range_the_kernel_picks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "missing")
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        assert port >= _ephemeral_start()
