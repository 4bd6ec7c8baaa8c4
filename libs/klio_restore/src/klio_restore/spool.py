"""The WAL prefetch spool beside ``%p``: its layout, lock, requests, log and the rename fast path.

``restore_command`` runs once per segment and replay waits for it, so ``klio wal-restore`` first
looks here: a segment the prefetcher (``klio_restore.prefetch``) already decoded is renamed to
``%p`` and the call is over. This module is imported on that path before anything else, so it
uses ``os``, ``sys`` and ``time`` only (no settings, no YAML, no cryptography).

The spool, ``<dirname(%p)>/.klio-prefetch/`` (under PGDATA, never on Tier 1; directories 0700,
files 0600, all owned by the server's OS user):

- ``lock``: the running prefetcher (pid, run token, configuration, cluster), created by link(2)
  of a complete file, so it is never seen half written; stale once its pid is gone;
- ``run-<token>/<segment>``: verified plaintext segments written by the prefetcher holding the
  lock with that token, and by nobody else: leftovers of a dead prefetcher are never served;
  ``<segment>.tmp`` exists while that segment is being decoded;
- ``request``: the last segment PostgreSQL asked for (the prefetcher works on the segments after
  it, and gives up when it has not changed for a while);
- ``log``: one line per hit and miss of the fast path, and the prefetcher's start, errors and exit.
"""

# pathlib costs this path milliseconds of imports per segment: plain os calls instead.
# ruff: noqa: PTH100, PTH104, PTH110, PTH112, PTH118, PTH120, PTH208

from __future__ import annotations

import os
import sys
import time

SPOOL_NAME = ".klio-prefetch"
DEFAULT_DEPTH = 8
WAIT_LIMIT = 30.0
"""How long a call waits for a segment the prefetcher is decoding before decoding it itself."""

_HEX = frozenset("0123456789ABCDEF")
_MARK = b"klio_restore.prefetch"  # in the prefetcher's command line: a reused pid is not it
_FILE = 0o600
_DIR = 0o700


def is_segment_name(name: str) -> bool:
    """Whether ``name`` is a WAL segment name (not a history file or ``.partial``)."""
    return len(name) == 24 and _HEX.issuperset(name)


def spool_dir(dest: str) -> str:
    """The spool that serves ``dest`` (``%p``): ``.klio-prefetch`` in the same directory."""
    return os.path.join(os.path.dirname(dest) or ".", SPOOL_NAME)


class Owner:
    """A prefetcher as its lock file describes it.

    Args:
        pid: its process id.
        token: random per run; names its run directory.
        config: the configuration file it reads (``--config`` or ``KLIO_CONFIG``).
        cluster: the ``--cluster`` it serves, or ``""``.
    """

    __slots__ = ("cluster", "config", "pid", "token")

    def __init__(self, pid: int, token: str, config: str, cluster: str) -> None:
        self.pid = pid
        self.token = token
        self.config = config
        self.cluster = cluster

    def encode(self) -> bytes:
        """The lock file's content."""
        return f"{self.pid}\n{self.token}\n{self.config}\n{self.cluster}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> Owner | None:
        """Parse a lock file's content; None when it is not one."""
        fields = data.decode(errors="replace").split("\n")
        if len(fields) != 5 or fields[4] or not fields[0].isdigit() or not fields[1].isalnum():
            return None
        return cls(int(fields[0]), fields[1], fields[2], fields[3])

    def run_dir(self, spool: str) -> str:
        """Where this prefetcher, and only it, puts decoded segments."""
        return os.path.join(spool, f"run-{self.token}")


def identity(config: str | None, cluster: str | None) -> tuple[str, str]:
    """What a call and a prefetcher must share for the spool to serve the call."""
    return config or os.environ.get("KLIO_CONFIG", ""), cluster or ""


def is_prefetcher(pid: int) -> bool:
    """Whether ``pid`` is a live prefetcher (not a zombie, not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's: the command line says whose
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return _MARK in f.read()
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover - no /proc: trust the signal probe
        return True


def read_owner(spool: str) -> Owner | None:
    """The owner named by the lock, alive or not; None without a (valid) lock."""
    try:
        with open(os.path.join(spool, "lock"), "rb") as f:
            return Owner.decode(f.read())
    except FileNotFoundError:
        return None


def live_owner(spool: str) -> Owner | None:
    """The prefetcher holding the lock, if it is running."""
    owner = read_owner(spool)
    return owner if owner is not None and is_prefetcher(owner.pid) else None


def write_request(spool: str, name: str) -> None:
    """Record that PostgreSQL asked for segment ``name``.

    Overwritten in place, not replaced by rename: ext4 flushes a file renamed over another
    (auto_da_alloc), which costs milliseconds per call. Every name has 24 bytes, and a reader
    that catches a torn name only misjudges what to decode next, never what it serves.
    """
    fd = os.open(os.path.join(spool, "request"), os.O_WRONLY | os.O_CREAT, _FILE)
    try:
        os.pwrite(fd, name.encode(), 0)
    finally:
        os.close(fd)


def read_request(spool: str) -> tuple[str, float] | None:
    """The last requested segment and when it was requested (unix time), or None."""
    try:
        fd = os.open(os.path.join(spool, "request"), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 64).decode(errors="replace"), os.fstat(fd).st_mtime
    finally:
        os.close(fd)


def log(spool: str, event: str) -> None:
    """Append one line to the spool's log (appends of one short line do not interleave)."""
    line = f"{time.time():.3f} {os.getpid()} {event}\n".encode()
    fd = os.open(os.path.join(spool, "log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, _FILE)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def serve(
    name: str,
    dest: str,
    *,
    config: str | None,
    cluster: str | None,
    depth: int = DEFAULT_DEPTH,
    wait_limit: float = WAIT_LIMIT,
) -> bool:
    """Restore segment ``name`` to ``dest`` by a rename from the spool, if it is there.

    Never raises: the spool only saves time, so any problem with it means a normal fetch.

    Args:
        name: ``%f``; only segment names use the spool.
        dest: ``%p``.
        config: the ``--config`` file (None: ``KLIO_CONFIG``); the prefetcher must use the same.
        cluster: the ``--cluster``, or None.
        depth: 0 disables the spool.
        wait_limit: seconds to wait for ``name`` while the prefetcher is decoding it.

    Returns:
        True when ``dest`` now holds the segment; False when the caller must fetch it (and then
        call `follow`).
    """
    if depth <= 0 or not is_segment_name(name):
        return False
    spool = spool_dir(dest)
    try:
        # First, even before taking the file: the prefetcher keeps this segment and moves on.
        write_request(spool, name)  # FileNotFoundError: no spool yet
        owner = live_owner(spool)
        if owner is None or (owner.config, owner.cluster) != identity(config, cluster):
            return False
        if not _take(spool, owner, name, dest, wait_limit):
            return False
    except Exception:  # any spool failure falls back to a normal fetch
        return False
    try:
        log(spool, f"hit {name}")
    except OSError:
        pass
    return True


def follow(
    name: str, dest: str, *, config: str | None, cluster: str | None, depth: int = DEFAULT_DEPTH
) -> None:
    """After ``name`` was restored the normal way: make sure a prefetcher works on what follows.

    Never raises: recovery must not depend on the prefetcher.
    """
    if depth <= 0 or not is_segment_name(name):
        return
    spool = spool_dir(dest)
    try:
        if os.path.isdir(spool):
            log(spool, f"miss {name}")
            if live_owner(spool) is not None:
                return
        spawn(spool, name, depth=depth, config=config, cluster=cluster)
    except Exception:  # noqa: S110 - the next call tries again
        pass


def _take(spool: str, owner: Owner, name: str, dest: str, wait_limit: float) -> bool:
    path = os.path.join(owner.run_dir(spool), name)
    deadline = time.monotonic() + wait_limit
    while True:
        # Looked at before the rename: the prefetcher renames .tmp to the name, never back.
        in_flight = os.path.exists(path + ".tmp")
        try:
            os.rename(path, dest)
            return True
        except FileNotFoundError:
            pass
        if not in_flight or time.monotonic() > deadline or not is_prefetcher(owner.pid):
            return False
        time.sleep(0.002)


def spawn(spool: str, request: str, *, depth: int, config: str | None, cluster: str | None) -> int:
    """Start a detached prefetcher for the segments after ``request``.

    It exits at once when another one runs, or when the next segment is not archived (then
    without creating the spool).

    Returns:
        Its pid.
    """
    argv = [sys.executable, "-m", "klio_restore.prefetch", "--spool", os.path.abspath(spool)]
    argv += ["--request", request, "--depth", str(depth)]
    if config:
        argv += ["--config", config]
    if cluster:
        argv += ["--cluster", cluster]
    null = os.open(os.devnull, os.O_RDWR)
    try:
        err = os.open(os.path.join(spool, "log"), os.O_WRONLY | os.O_APPEND, _FILE)
    except FileNotFoundError:
        err = os.dup(null)  # no spool yet: the prefetcher sends stderr to the log it creates
    try:
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_DUP2, null, 0),
            (os.POSIX_SPAWN_DUP2, null, 1),
            (os.POSIX_SPAWN_DUP2, err, 2),
        ]
        # Descriptors PostgreSQL let restore_command inherit stay with this short call.
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited_fds()]
        # A session of its own: PostgreSQL's signals to restore_command's group spare it.
        return os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions, setsid=True)
    finally:
        os.close(null)
        os.close(err)


def _inherited_fds() -> list[int]:
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # pragma: no cover - no /proc
        return []
    found = []
    for fd in map(int, names):
        try:
            if fd > 2 and os.get_inheritable(fd):
                found.append(fd)
        except OSError:
            continue  # the directory listing's own descriptor, closed by now
    return found
