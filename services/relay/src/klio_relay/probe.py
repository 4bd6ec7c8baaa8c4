"""Whether the bucket can be used now: a cheap, cached answer for ``/readyz`` and the handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from klio_common.errors import KlioError
from klio_common.storage.s3 import BucketUnavailable, S3Store

log = logging.getLogger("klio.relay")


class BucketProbe:
    """Checks the bucket at most every ``interval`` seconds, and learns from every request.

    Args:
        store: the bucket.
        interval: seconds between checks; no check is made while requests keep succeeding.
        on_usable: called whenever the bucket becomes usable (after start or an outage).
    """

    def __init__(
        self,
        store: S3Store,
        *,
        interval: float = 5.0,
        on_usable: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.interval = interval
        self.on_usable = on_usable
        self.ok = False
        self.reason = "bucket not checked yet"
        self._last_ok = 0.0
        self._logged: str | None = None
        self._changed = asyncio.Event()

    def readiness(self) -> tuple[bool, str]:
        """For `Health.add_check`: reachable, or why not."""
        return (True, "reachable") if self.ok else (False, self.reason)

    def error(self) -> BucketUnavailable:
        """The error a handler raises while the bucket is known to be unusable."""
        return BucketUnavailable(self.reason)

    def succeeded(self) -> None:
        """A request to the bucket just worked."""
        self._last_ok = time.monotonic()
        if not self.ok:
            self._set(True, "reachable")

    def failed(self, exc: BucketUnavailable) -> None:
        """A request failed because of the bucket: not ready until a check passes."""
        self._set(False, exc.reason, exc)

    def _set(self, ok: bool, reason: str, exc: KlioError | None = None) -> None:
        changed = ok != self.ok
        self.ok, self.reason = ok, reason
        if changed:
            self._changed.set()
            if ok and self.on_usable is not None:
                self.on_usable()
        if ok:
            if self._logged is not None:
                log.info("bucket '%s' is usable again", self.store.bucket)
            self._logged = None
        elif self._logged != reason:
            self._logged = reason  # once per distinct reason, not once per check
            log.error(reason, extra={"hint": exc.hint if exc else None})

    async def check(self) -> bool:
        """Make one request now; return whether the bucket is usable."""
        try:
            await self.store.check()
        except BucketUnavailable as exc:
            self.failed(exc)
        except KlioError as exc:
            self._set(False, f"bucket refused: {exc.message}", exc)
        else:
            self.succeeded()
        return self.ok

    async def run(self, stop: asyncio.Event) -> None:
        """Check until ``stop`` (only when no request succeeded for ``interval`` seconds)."""
        while not stop.is_set():
            if not self.ok or time.monotonic() - self._last_ok >= self.interval:
                await self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def wait_usable(self, stop: asyncio.Event) -> bool:
        """Wait until the bucket is usable (True) or ``stop`` is set (False)."""
        while not self.ok and not stop.is_set():
            self._changed.clear()
            waiters = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._changed.wait()),
            ]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
        return self.ok
