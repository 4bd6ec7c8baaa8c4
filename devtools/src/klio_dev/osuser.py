"""Commands and files for PostgreSQL's OS user, which the test servers run as."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from klio_dev.processes import ServerError
from klio_dev.waiting import scaled

PG_BIN = Path("/usr/lib/postgresql/15/bin")
OS_USER = "postgres"
__all__ = ["OS_USER", "PG_BIN", "owned_by_postgres", "run_as_postgres"]


def run_as_postgres(
    argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a command as the PostgreSQL OS user (``runuser`` when we are root).

    Args:
        argv: the command; a bare program name found in the PostgreSQL bin directory
            (``pg_waldump``, ``pg_checksums``...) is run from there.
        check: raise when the command fails.
        input: text for the command's stdin.
        timeout: seconds before the command is killed, scaled for slow machines.

    Returns:
        The finished process, with text stdout and stderr.

    Raises:
        ServerError: ``check`` is set and the command exited non-zero.
    """
    argv = list(argv)
    if "/" not in argv[0] and (PG_BIN / argv[0]).exists():
        argv[0] = str(PG_BIN / argv[0])
    if os.geteuid() == 0:
        argv = ["runuser", "-u", OS_USER, "--", *argv]
    # A stray PGHOST or PGPASSWORD from the caller's shell must not redirect the harness.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    done = subprocess.run(
        argv,
        input=input,
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=scaled(timeout),
        check=False,
    )
    if check and done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise ServerError(f"{' '.join(argv)} failed with status {done.returncode}: {output}")
    return done


def owned_by_postgres(path: Path, mode: int) -> None:
    """Give ``path`` mode ``mode`` and, when we are root, to the PostgreSQL OS user."""
    path.chmod(mode)
    if os.geteuid() == 0:
        shutil.chown(path, OS_USER, OS_USER)
