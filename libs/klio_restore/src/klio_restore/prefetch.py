"""The WAL prefetcher: decodes the segments after the last requested one into the spool.

Run detached by ``klio wal-restore`` (``python -m klio_restore.prefetch --spool DIR ...``; see
``klio_restore.spool`` for the layout). One per spool (the lock); it decodes on two threads, stays
at most ``depth`` segments ahead of the last segment PostgreSQL asked for, deletes what is behind
it, and exits when nothing was asked for ``idle`` seconds, when the segment after the last request
is not archived, or when it no longer holds the lock. It writes only verified, complete plaintext
segments under their own name; a segment it cannot deliver is simply absent from the spool, and
the foreground call then fetches it (and reports the error itself).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from klio_restore import spool as sp

THREADS = 2
IDLE_EXIT = 30.0
POLL = 0.02
RETRY_MISSING = 1.0
LOG_LIMIT = 1 << 20
NICE = 10
RESERVE_SEGMENTS = 4
"""Free space, in segments, the spool leaves on its volume (pg_wal's) beyond what it writes:
PostgreSQL needs room there to go on (restored files, new segments at the end of recovery)."""


def window(request: str, depth: int, seg_size: int) -> list[str]:
    """The segments to have in the spool: the ``depth`` after ``request`` on its timeline."""
    from klio_common.pg.walname import WalSegment

    try:
        seg = WalSegment.parse(request, seg_size)
        names = []
        for _ in range(depth):
            seg = seg.next()
            names.append(seg.name)
    except ValueError:  # not a segment name, or the end of the LSN space
        return []
    return names


def obsolete(names: Iterable[str], request: str, depth: int, seg_size: int) -> list[str]:
    """Spooled segments to delete: before the last requested one, or further than ``depth``.

    Segments of other timelines inside that range are kept: PostgreSQL may try a newer timeline's
    name first and then take the older one.
    """
    from klio_common.pg.walname import WalSegment

    try:
        low = WalSegment.parse(request, seg_size).segno
    except ValueError:
        return list(names)
    doomed = []
    for name in names:
        try:
            segno = WalSegment.parse(name, seg_size).segno
        except ValueError:
            segno = -1
        if not low <= segno <= low + depth:
            doomed.append(name)
    return doomed


def acquire(
    spool: Path, owner: sp.Owner, *, alive: Callable[[int], bool] = sp.is_prefetcher
) -> bool:
    """Take the spool's lock for ``owner``, breaking a stale one (its pid is not a prefetcher).

    Returns:
        False when another live prefetcher holds it.
    """
    lock = spool / "lock"
    for _ in range(5):
        tmp = spool / f".lock-{owner.token}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, owner.encode())
        finally:
            os.close(fd)
        try:
            os.link(tmp, lock)  # O_EXCL with the content already in place
            return True
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        try:
            seen = lock.read_bytes()
        except FileNotFoundError:
            continue
        current = sp.Owner.decode(seen)
        if current is not None and alive(current.pid):
            return False
        _break(lock, seen)
    return False


def _break(lock: Path, seen: bytes) -> None:
    aside = lock.with_name(f"lock.stale-{os.getpid()}")
    try:
        lock.rename(aside)
    except FileNotFoundError:
        return
    if (
        aside.read_bytes() != seen
    ):  # a prefetcher took the lock after we judged it stale: give it back
        try:
            os.link(aside, lock)
        except FileExistsError:
            pass  # a third took it; the one we displaced sees that and exits
    aside.unlink()


def owns(spool: Path, owner: sp.Owner) -> bool:
    """Whether ``owner`` still holds the spool's lock."""
    try:
        return (spool / "lock").read_bytes() == owner.encode()
    except FileNotFoundError:
        return False


class Prefetcher:
    """Keeps the spool filled for one run (the caller holds the lock).

    Args:
        spool: the spool directory.
        owner: this run (its token names the run directory, which must exist).
        fetch: the verified plaintext of a segment by name, or None when it is not archived.
        seg_size: the cluster's WAL segment size.
        depth: how many segments to keep ahead of the last request.
        idle: seconds without a new request after which the run ends.
    """

    def __init__(
        self,
        spool: Path,
        owner: sp.Owner,
        fetch: Callable[[str], bytes | None],
        *,
        seg_size: int,
        depth: int,
        idle: float = IDLE_EXIT,
    ) -> None:
        self.spool = spool
        self.owner = owner
        self.run_dir = Path(owner.run_dir(str(spool)))
        self.fetch = fetch
        self.seg_size = seg_size
        self.depth = depth
        self.idle = idle
        self.in_flight: dict[Future[bool], tuple[str, float]] = {}
        self.missing: dict[str, float] = {}  # name -> when the lookup that missed it began
        self.failed: set[str] = set()
        self.paused = False  # for lack of space on the volume

    def run(self) -> str:
        """Work until there is nothing left to do; returns why it stopped."""
        with ThreadPoolExecutor(THREADS, thread_name_prefix="klio-prefetch") as pool:
            try:
                return self._loop(pool)
            finally:
                for future in self.in_flight:
                    future.cancel()

    def _loop(self, pool: ThreadPoolExecutor) -> str:
        while True:
            if not owns(self.spool, self.owner):
                return "lock lost"
            request = sp.read_request(str(self.spool))
            if request is None:
                return "no request"
            name, asked = request
            if time.time() - asked > self.idle:
                return f"no request for {self.idle:g} s"
            self._reap()
            ahead = window(name, self.depth, self.seg_size)
            if not ahead:
                return f"not a segment name: {name!r}"
            if self.missing.get(ahead[0], 0.0) >= asked:
                return f"{ahead[0]} is not archived"
            present = {p.name for p in self.run_dir.iterdir()}
            if sp.read_request(str(self.spool)) != request:
                continue  # PostgreSQL moved on while we looked: look again
            complete = (n for n in present if not n.endswith(".tmp"))
            for gone in obsolete(complete, name, self.depth, self.seg_size):
                (self.run_dir / gone).unlink()
            self._submit(pool, ahead, present)
            if self.in_flight:
                wait(self.in_flight, timeout=POLL, return_when=FIRST_COMPLETED)
            else:
                time.sleep(POLL)

    def _submit(self, pool: ThreadPoolExecutor, ahead: list[str], present: set[str]) -> None:
        busy = {n for n, _ in self.in_flight.values()}
        now = time.time()
        for name in ahead:
            if len(self.in_flight) >= THREADS:
                return
            if name in present or name in busy or name in self.failed:
                continue
            if now - self.missing.get(name, -RETRY_MISSING) < RETRY_MISSING:
                return  # nothing after a segment the archive does not have yet
            if not self._room():
                return
            self.in_flight[pool.submit(self._spool_one, name)] = (name, now)

    def _room(self) -> bool:
        """Whether one more segment fits and leaves `RESERVE_SEGMENTS` free (logged on change)."""
        st = os.statvfs(self.run_dir)
        free = st.f_bavail * st.f_frsize
        room = free >= (len(self.in_flight) + 1 + RESERVE_SEGMENTS) * self.seg_size
        if room == self.paused:
            self.paused = not room
            mib = f"{free >> 20} MiB free, {RESERVE_SEGMENTS} segments kept for PostgreSQL"
            sp.log(str(self.spool), f"paused {mib}" if self.paused else f"resumed {mib}")
        return room

    def _reap(self) -> None:
        for future in [f for f in self.in_flight if f.done()]:
            name, began = self.in_flight.pop(future)
            error = future.exception()
            if error is not None:
                self.failed.add(name)  # the foreground call fetches it and reports the error
                first = str(error).split("\n", 1)[0]
                sp.log(str(self.spool), f"failed {name}: {type(error).__name__}: {first}")
            elif future.result():
                self.missing.pop(name, None)
            else:
                self.missing[name] = began

    def put(self, name: str, data: bytes) -> None:
        """Spool segment ``name``, already fetched (and so verified), if it fits."""
        if self._room():
            self._spool_one(name, lambda _: data)

    def _spool_one(self, name: str, fetch: Callable[[str], bytes | None] | None = None) -> bool:
        final = self.run_dir / name
        tmp = self.run_dir / f"{name}.tmp"  # created first: callers see it is on its way
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        done = False
        try:
            os.fchmod(fd, 0o600)
            data = (fetch or self.fetch)(name)
            if data is None:
                return False
            if len(data) != self.seg_size:
                raise ValueError(f"{len(data)} bytes, not a {self.seg_size}-byte segment")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            done = True
        finally:
            os.close(fd)
            if done:
                tmp.rename(final)
            else:
                tmp.unlink()
        return True


def run(
    spool: Path,
    *,
    request: str,
    depth: int,
    config: str | None,
    cluster: str | None,
    idle: float = IDLE_EXIT,
) -> str:
    """Run one prefetcher on ``spool`` unless another runs; returns why it stopped.

    Nothing is created unless the segment after ``request`` (or after the spool's own request
    file, which is newer) is archived.
    """
    if spool.is_dir():
        if sp.live_owner(str(spool)) is not None:
            return "another prefetcher runs"
        request = (sp.read_request(str(spool)) or (request, 0.0))[0]
    fetch, seg_size = _archive(config, cluster)
    ahead = window(request, depth, seg_size)
    first = fetch(ahead[0]) if ahead else None
    if first is None:
        return "nothing to prefetch"
    spool.mkdir(0o700, exist_ok=True)
    owner = sp.Owner(os.getpid(), os.urandom(8).hex(), *sp.identity(config, cluster))
    if not acquire(spool, owner):
        return "another prefetcher runs"
    run_dir = Path(owner.run_dir(str(spool)))
    try:
        for entry in spool.glob("run-*"):  # of dead prefetchers: never served, now removed
            shutil.rmtree(entry, ignore_errors=True)
        run_dir.mkdir(0o700)
        _rotate_log(spool)
        log = os.open(spool / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(log, 2)  # tracebacks, if any, where the operator looks
        os.close(log)
        if sp.read_request(str(spool)) is None:
            sp.write_request(str(spool), request)
        sp.log(str(spool), f"prefetcher started after {request}: depth {depth}")
        prefetcher = Prefetcher(spool, owner, fetch, seg_size=seg_size, depth=depth, idle=idle)
        prefetcher.put(ahead[0], first)
        return prefetcher.run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if owns(spool, owner):
            (spool / "lock").unlink()


def _archive(config: str | None, cluster: str | None) -> tuple[Callable[[str], bytes | None], int]:
    from klio_restore import walfetch
    from klio_restore.context import load_settings, open_cluster

    ctx = open_cluster(load_settings(Path(config) if config else None, os.environ), cluster)
    # the same sources as the foreground wal-restore: Tier 1, then the bucket when configured
    chain = walfetch.sources(ctx.tier1, ctx.keyring, ctx.bucket_wal if ctx.has_tier2 else None)
    seg_size = ctx.wal.segment_size()
    return lambda name: walfetch.lookup(name, chain), seg_size


def _rotate_log(spool: Path) -> None:
    path = spool / "log"
    try:
        if path.stat().st_size > LOG_LIMIT:
            path.replace(spool / "log.1")
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m klio_restore.prefetch``."""
    parser = argparse.ArgumentParser(
        prog="python -m klio_restore.prefetch",
        description="Decode the WAL segments after the last one requested into a spool "
        "(started by klio wal-restore).",
    )
    parser.add_argument("--spool", type=Path, required=True, help="the spool directory")
    parser.add_argument("--request", default="", help="the segment just restored")
    parser.add_argument("--depth", type=int, default=sp.DEFAULT_DEPTH, help="segments ahead")
    parser.add_argument("--config", help="configuration file (default: $KLIO_CONFIG)")
    parser.add_argument("--cluster", help="cluster name")
    parser.add_argument("--idle", type=float, default=IDLE_EXIT, help="seconds before exiting")
    ns = parser.parse_args(argv)
    # Exiting through the finally blocks removes the run directory and the lock.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Replay is the critical path; decoding ahead only has to keep up with it. When both want
    # the CPU (same container, same cores), the server's startup process goes first.
    os.nice(NICE)
    try:
        reason = run(
            ns.spool,
            request=ns.request,
            depth=ns.depth,
            config=ns.config,
            cluster=ns.cluster,
            idle=ns.idle,
        )
    except Exception as exc:  # logged for the operator; recovery goes on without the spool
        first = str(exc).split("\n", 1)[0]
        _note(ns.spool, f"prefetcher stopped: {type(exc).__name__}: {first}")
        return 1
    if reason != "another prefetcher runs":
        _note(ns.spool, f"prefetcher exited: {reason}")
    return 0


def _note(spool: Path, event: str) -> None:
    try:
        sp.log(str(spool), event)
    except FileNotFoundError:
        pass  # it never created the spool


if __name__ == "__main__":
    sys.exit(main())
