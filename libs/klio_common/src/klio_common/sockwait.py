"""Waiting on a socket from asyncio without blocking: one wait, or a watch kept while streaming.

psycopg's ``pq`` layer is used in non-blocking mode (pitfall P1): the code waits for the socket
with the event loop and then lets libpq read or write. `wait_fd` is the one-off wait (register,
wait, unregister). `ReadWatch` keeps one registration for as long as a stream runs: a synchronous
standby waits once per commit, and two ``epoll_ctl`` calls, a timer and an ``asyncio.wait`` per
commit were a measurable share of its commit latency.
"""

from __future__ import annotations

import asyncio


async def wait_fd(
    fd: int, write: bool, timeout: float | None, interrupt: asyncio.Future[object] | None = None
) -> None:
    """Wait until ``fd`` is readable (or writable) or ``interrupt`` is done.

    Raises:
        TimeoutError: nothing happened within ``timeout``.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        waiters: set[asyncio.Future[object]] = {fut}  # type: ignore[arg-type]
        if interrupt is not None:
            waiters.add(interrupt)
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise TimeoutError
    finally:
        fut.cancel()
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class ReadWatch:
    """``fd`` watched for reading until `close`: wake-ups are remembered between waits.

    The registration is level-triggered: while unread data waits, the loop calls back on every
    iteration, so a wake-up may be remembered after the caller already read everything; the
    next `wait` then returns at once and the caller finds nothing to read, which is harmless.
    Nothing else may register a reader for ``fd`` while the watch is open.
    """

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._ready = False
        self._waiter: asyncio.Future[bool] | None = None
        self._loop.add_reader(fd, self._on_ready)

    def _on_ready(self) -> None:
        self._ready = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def wait(
        self, timeout: float | None, interrupt: asyncio.Future[object] | None = None
    ) -> bool:
        """True once ``fd`` is readable (or was since the last wait); False after ``timeout``
        seconds or once ``interrupt`` is done."""
        if self._ready:
            self._ready = False
            return True
        if interrupt is not None and interrupt.done():
            return False
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiter = waiter

        def give_up(_: object = None) -> None:
            if not waiter.done():
                waiter.set_result(False)

        timer = self._loop.call_later(timeout, give_up) if timeout is not None else None
        if interrupt is not None:
            interrupt.add_done_callback(give_up)
        try:
            return await waiter
        finally:
            self._waiter = None
            self._ready = False
            if timer is not None:
                timer.cancel()
            if interrupt is not None:
                interrupt.remove_done_callback(give_up)

    def close(self) -> None:
        """Stop watching (safe to call more than once)."""
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
