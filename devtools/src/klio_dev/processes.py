"""Server processes the harness owns: start, readiness, stop, and a kill-all at exit."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from klio_dev.ports import free_port
from klio_dev.waiting import scaled, wait_until


class ServerError(RuntimeError):
    """A harness server failed to start, stop or run a command."""


class _Killable(Protocol):
    def kill(self) -> None: ...


_lock = threading.Lock()
_running: dict[int, _Killable] = {}


def track(server: _Killable) -> None:
    """Remember a running server so that it is killed at interpreter exit."""
    with _lock:
        _running[id(server)] = server


def untrack(server: _Killable) -> None:
    """Forget a server that has been stopped."""
    with _lock:
        _running.pop(id(server), None)


def tracked() -> list[_Killable]:
    """Return the servers still running (started and not stopped)."""
    with _lock:
        return list(_running.values())


@atexit.register
def kill_all() -> None:
    """Kill every server still running; a test that forgot one must not leak a process."""
    for server in tracked():
        try:
            server.kill()
        except Exception:  # noqa: S112 - exiting anyway: kill what can be killed
            continue


def port_taken(error: ServerError, may_move: bool) -> bool:
    """Return True when a start failed because the port was in use and may be changed."""
    return may_move and "address already in use" in str(error).lower()


def tail(path: Path, lines: int = 20) -> str:
    """Return the last ``lines`` lines of a log file, or a note when there is none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class ServerProcess:
    """A server run as our child process, logging to a file in its own directory.

    Subclasses supply the command line and the readiness check. ``start()`` after
    ``stop()`` or ``kill()`` reuses the port and the directory.

    Args:
        base_dir: parent directory; the server works in ``base_dir / name``.
        name: directory and log name.
        port: TCP port, or None for a free one.
    """

    start_timeout = 30.0
    stop_timeout = 10.0

    def __init__(self, base_dir: Path, *, name: str, port: int | None = None) -> None:
        self.name = name
        self.dir = base_dir / name
        self.port = port if port is not None else free_port()
        self.log_path = self.dir / f"{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._auto_port = port is None
        self._started = False

    def argv(self) -> list[str]:
        """Return the command line that runs the server."""
        raise NotImplementedError

    def process_env(self) -> dict[str, str] | None:
        """Return the server process's environment, or None to inherit ours."""
        return None

    def ready(self, log_offset: int) -> bool:
        """Return True once the server accepts clients (log written after ``log_offset``)."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while running, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    def log_text(self, offset: int = 0) -> str:
        """Return the log from byte ``offset`` on."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> Self:
        """Start the server and wait until it is ready; no-op when running.

        A port picked by `free_port` may be taken by someone else before the server binds
        it; the first start then moves to another free port once.

        Raises:
            ServerError: the process exited or was not ready in time (the log tail is included).
        """
        if self.running:
            return self
        try:
            self._launch()
        except ServerError as exc:
            if not port_taken(exc, self._auto_port and not self._started):
                raise
            self.port = free_port()
            self._launch()
        self._started = True
        return self

    def _launch(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=self.process_env(),
                # Own session: a Ctrl-C in the terminal must not reach it before stop() does.
                start_new_session=True,
            )
        track(self)
        try:
            wait_until(lambda: self._check_ready(offset), self.start_timeout, self.describe())
        except BaseException as exc:
            self.kill()
            if isinstance(exc, ServerError | TimeoutError):
                raise ServerError(f"{exc}\n--- {self.log_path} ---\n{tail(self.log_path)}") from exc
            raise

    def _check_ready(self, offset: int) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise ServerError(f"{self.describe()} exited with status {code} while starting")
        return self.ready(offset)

    def describe(self) -> str:
        """Name the server in messages: kind, port and directory."""
        return f"{type(self).__name__} on port {self.port} in {self.dir}"

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully (SIGTERM), killing it if it has not exited in time; idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(scaled(timeout if timeout is not None else self.stop_timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        untrack(self)

    def kill(self) -> None:
        """Kill the process with SIGKILL (a crash); idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        untrack(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def pid_alive(pid: int) -> bool:
    """Return True when ``pid`` names a live process (zombies count as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """Return the ids of the direct children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def kill_pids(pids: list[int], what: str) -> None:
    """SIGKILL ``pids`` and wait until none of them is alive."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, f"{what} to die after SIGKILL")
