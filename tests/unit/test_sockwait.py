"""The socket waits of the replication connection, on a real socket pair."""

from __future__ import annotations

import asyncio
import socket

import pytest

from klio_common.sockwait import ReadWatch, wait_fd


async def test_a_watch_wakes_on_data_and_gives_up_on_time() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    watch = ReadWatch(a.fileno())
    try:
        assert await watch.wait(0.01) is False  # nothing sent: the timer wins
        asyncio.get_running_loop().call_soon(b.send, b"x")
        assert await watch.wait(5) is True
        assert a.recv(10) == b"x"
        await watch.wait(0.01)  # at most one stale wake-up (level-triggered), then a timeout
        assert await watch.wait(0.01) is False
        stop: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(stop.set_result, None)
        assert await watch.wait(5, stop) is False  # the interrupt wins
        assert await watch.wait(5, stop) is False  # and keeps winning once done
    finally:
        watch.close()
        watch.close()
        a.close()
        b.close()


async def test_a_wake_up_between_waits_is_remembered() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    watch = ReadWatch(a.fileno())
    try:
        b.send(b"y")
        await asyncio.sleep(0)  # one loop iteration: the reader callback runs, nobody waits
        await asyncio.sleep(0)
        assert await watch.wait(None) is True
    finally:
        watch.close()
        a.close()
        b.close()


async def test_closing_the_watch_frees_the_socket_for_a_one_off_wait() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    watch = ReadWatch(a.fileno())
    watch.close()
    try:
        with pytest.raises(TimeoutError):
            await wait_fd(a.fileno(), False, 0.01)
        b.send(b"z")
        await wait_fd(a.fileno(), False, 5)
        assert a.recv(10) == b"z"
    finally:
        a.close()
        b.close()
