"""Tests for klio_relay.window.Window: a sliding window, settled in groups, stopping on failure."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from klio_common.errors import Permanent, Retryable
from klio_relay.window import Window


class Recorder:
    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started: list[int] = []
        self.groups: list[list[tuple[int, object]]] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self.changed.clear()
            await self.changed.wait()

    async def work(self, item: int) -> int:
        self.started.append(item)
        self.changed.set()
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            gate = self.gates.get(item)
            if gate is not None:
                await gate.wait()
            else:
                await asyncio.sleep(0)
            if item < 0:
                raise Permanent(f"item {item} is corrupt")
            if item >= 1000:
                raise Retryable(f"item {item}: bucket away")
            return item * 10
        finally:
            self.running -= 1

    async def settle(self, group: list[tuple[int, int | BaseException]]) -> None:
        self.groups.append(list(group))
        self.changed.set()

    def settled(self) -> dict[int, object]:
        out: dict[int, object] = {}
        for group in self.groups:
            for item, result in group:
                assert item not in out, f"{item} settled twice"
                out[item] = result
        return out


async def test_every_item_runs_once_within_the_limit_and_is_settled_once() -> None:
    rec = Recorder()
    errors = await Window(rec.work, 4, rec.settle).run(list(range(50)))
    assert errors == []
    assert sorted(rec.started) == list(range(50))
    assert rec.most <= 4
    assert rec.settled() == {i: i * 10 for i in range(50)}
    assert len(rec.groups) > 1  # settled in groups while others ran, not once at the end


async def test_a_slow_item_does_not_hold_back_the_next_ones() -> None:
    rec = Recorder()
    rec.gates[0] = asyncio.Event()
    task = asyncio.create_task(Window(rec.work, 2, rec.settle).run(list(range(10))))
    await rec.until(lambda: len(rec.settled()) == 9)  # everything else passes the slow one
    assert not task.done() and rec.running == 1
    rec.gates[0].set()
    assert await task == []
    assert set(rec.settled()) == set(range(10))


async def test_a_fatal_failure_stops_new_work_and_settles_what_ran() -> None:
    rec = Recorder()
    rec.gates[1] = asyncio.Event()
    task = asyncio.create_task(Window(rec.work, 2, rec.settle).run([1, 1000, 2, 3, 4]))
    await rec.until(lambda: 1000 in rec.settled())
    rec.gates[1].set()
    errors = await task
    assert [type(e) for e in errors] == [Retryable]
    assert rec.started == [1, 1000]  # nothing new started after the failure
    assert rec.settled()[1] == 10  # the one in flight finished and was settled


async def test_failures_that_are_not_fatal_are_returned_and_the_rest_runs() -> None:
    rec = Recorder()
    window = Window(rec.work, 3, rec.settle, fatal=lambda exc: not isinstance(exc, Permanent))
    errors = await window.run([1, -1, 2, -2, 3])
    assert sorted(str(e) for e in errors) == ["item -1 is corrupt", "item -2 is corrupt"]
    assert sorted(rec.started) == [-2, -1, 1, 2, 3]


async def test_stop_ends_the_window_before_new_work() -> None:
    rec = Recorder()
    calls = 0

    def stop() -> None:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise Retryable("the relay is stopping")

    errors = await Window(rec.work, 1, rec.settle, stop).run(list(range(10)))
    assert [str(e) for e in errors] == ["the relay is stopping"]
    assert rec.started == [0, 1, 2]
    assert set(rec.settled()) == {0, 1, 2}


async def test_cancelling_cancels_the_work_in_flight() -> None:
    rec = Recorder()
    rec.gates[0] = asyncio.Event()
    task = asyncio.create_task(Window(rec.work, 2, rec.settle).run([0]))
    await rec.until(lambda: bool(rec.started))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rec.running == 0
