"""Polling for a condition with a deadline, scaled for slow machines."""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

_POLL_INTERVAL = 0.02


def timeout_multiplier() -> float:
    """Return the factor every harness timeout is scaled by.

    Returns:
        ``KLIO_TEST_TIMEOUT_MULTIPLIER`` as a float (CI sets it above 1), default 1.
    """
    raw = os.environ.get("KLIO_TEST_TIMEOUT_MULTIPLIER", "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"KLIO_TEST_TIMEOUT_MULTIPLIER must be a number, not {raw!r}") from None
    return value if value > 0 else 1.0


def scaled(timeout: float) -> float:
    """Return ``timeout`` seconds multiplied by `timeout_multiplier`."""
    return timeout * timeout_multiplier()


def _expired(what: str, timeout: float, last_error: BaseException | None) -> TimeoutError:
    detail = f" (last error: {last_error})" if last_error is not None else ""
    return TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}{detail}")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = _POLL_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns a truthy value.

    Args:
        predicate: called repeatedly; its first truthy result is returned.
        timeout: seconds before giving up, scaled by `timeout_multiplier`.
        what: what is awaited, named in the timeout error ("nats-server on port 4222").
        interval: seconds between calls.
        ignore: exception types that mean "not yet" (e.g. ``ConnectionRefusedError``).

    Returns:
        The first truthy value ``predicate`` returned.

    Raises:
        TimeoutError: the deadline passed; the message names ``what`` and the last ignored error.
    """
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            raise _expired(what, limit, last_error) from last_error
        time.sleep(interval)


@overload
async def wait_until_async(
    predicate: Callable[[], Awaitable[T | None]],
    timeout: float,
    what: str,
    *,
    interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


@overload
async def wait_until_async(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


async def wait_until_async(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = _POLL_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Like `wait_until`, for coroutines: the predicate may be sync or async.

    Args:
        predicate: a callable returning a value or an awaitable of one.
        timeout: seconds before giving up, scaled by `timeout_multiplier`.
        what: what is awaited, named in the timeout error.
        interval: seconds between calls.
        ignore: exception types that mean "not yet".

    Returns:
        The first truthy value ``predicate`` produced.

    Raises:
        TimeoutError: the deadline passed.
    """
    limit = scaled(timeout)
    deadline = time.monotonic() + limit
    last_error: BaseException | None = None
    while True:
        try:
            outcome = predicate()
            result = await outcome if inspect.isawaitable(outcome) else outcome
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            raise _expired(what, limit, last_error) from last_error
        await asyncio.sleep(interval)
