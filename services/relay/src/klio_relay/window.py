"""A sliding window of uploads: the next object starts as soon as any one in flight is done."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Settle = Callable[[list[tuple[T, R | BaseException]]], Awaitable[None]]


class Window(Generic[T, R]):
    """Runs ``work`` over items with at most ``limit`` running, settling results in groups.

    A fixed batch would wait for its slowest object before starting the next batch, so the
    uploads in flight would drop at the end of every batch; here a new one starts each time
    one ends. ``settle`` receives the finished items in groups of about ``limit / 2`` (e.g. to
    journal them with one fsync) while the others keep running. After the first failure no
    new work starts; the work in flight finishes and is settled too.

    Args:
        work: the coroutine per item.
        limit: the most items running at once.
        settle: awaited with every group of ``(item, result or exception)``, in completion
            order; every item is settled exactly once.
        stop: called before each new item starts; it may raise to stop the window.
        fatal: which failures stop new work (default: all); the others are only returned.
    """

    def __init__(
        self,
        work: Callable[[T], Awaitable[R]],
        limit: int,
        settle: Settle[T, R],
        stop: Callable[[], None] | None = None,
        fatal: Callable[[BaseException], bool] = lambda exc: True,
    ) -> None:
        self._work = work
        self._fatal = fatal
        self._limit = max(1, limit)
        self._settle = settle
        self._stop = stop
        self._group = max(1, self._limit // 2)

    async def run(self, items: Sequence[T]) -> list[BaseException]:
        """Process ``items``; return the exceptions of the items that failed (maybe none)."""
        pending: dict[asyncio.Task[R], T] = {}
        finished: list[tuple[T, R | BaseException]] = []
        errors: list[BaseException] = []
        stopped = False
        queue = list(reversed(items))
        try:
            while queue or pending:
                while queue and len(pending) < self._limit and not stopped:
                    if self._stop is not None:
                        try:
                            self._stop()
                        except Exception as refused:
                            errors.append(refused)
                            stopped = True
                            break
                    item = queue.pop()
                    pending[asyncio.ensure_future(self._work(item))] = item
                if not pending:
                    break
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    item = pending.pop(task)
                    failure = task.exception()
                    if failure is None:
                        finished.append((item, task.result()))
                    else:
                        finished.append((item, failure))
                        errors.append(failure)
                        stopped = stopped or self._fatal(failure)
                if len(finished) >= self._group or not pending:
                    group, finished = finished, []
                    await self._settle(group)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if finished:
            await self._settle(finished)
        return errors
