"""Free TCP ports on the loopback interface."""

from __future__ import annotations

import itertools
import random
import socket
from pathlib import Path

# The kernel takes the local port of every outgoing connection from this range: a port handed out
# from it can be taken by any client socket (a test's own connection to NATS...) before the
# server that was given it binds. Ports just below it are never taken that way.
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_SPAN = 16384  # ports below the ephemeral range handed out in turn (a test run uses thousands)
_LOWEST = 10000

# Indexes into the ports below the ephemeral range, from a random start (`next` is atomic).
_turn = itertools.count(random.randrange(_SPAN))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now.

    Ports come in turn from just below the kernel's ephemeral range (from a random start, so two
    processes seldom walk the same ports), and never twice in a process before the turn wraps:
    no outgoing connection and no earlier caller can take the port before the caller binds it.
    Where that range is unknown or too low, the kernel picks one (rarely, another process may
    then take it first; servers fail loudly when it happens).

    Returns:
        The port number.
    """
    ports = _below_ephemeral()
    if ports is not None:
        for _ in range(len(ports)):
            port = ports[next(_turn) % len(ports)]
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        picked: int = sock.getsockname()[1]
        return picked


def _below_ephemeral() -> range | None:
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    start = max(_LOWEST, low - _SPAN)
    return range(start, low) if low - start >= 1024 else None


def _bindable(port: int) -> bool:
    # SO_REUSEADDR as the servers bind (a port in TIME_WAIT is free for them).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    """Return True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
