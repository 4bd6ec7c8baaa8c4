"""The synchronous standby's turn in native code (`_turn.c`), where it was built.

A synchronous standby's commit waits for one turn of the pump: receive the WAL, seal it into a
frame of the ``.partial``, write it durably, report the flush. In Python a turn costs about
40 µs of interpreter on top of the system calls, and on a small node that CPU comes out of the
primary's backends. `NativeTurn` makes the common turns in C, without the GIL: the same libpq
functions (of the library psycopg loaded), the same frame layout (`frames.Sealer.seal_into`,
AES-256-GCM through OpenSSL), the same direct write (`directio.DirectTail`). Everything else
(a segment's first or last message, bytes to verify against a resumed ``.partial``, the first
append of a ``.partial``, errors, stops) comes back to Python, which also brings the metrics up
to date and reaps the segment worker every `pump.STATE_EVERY` seconds. Without encryption the
frames are plain (their CRC-32 covers the payload), as `Sealer.seal_into` writes them.

The module is optional: without a compiler (or with ``KLIO_NATIVE_TURN=0``) the pump runs its
Python loop, which is the reference the native one is tested against.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

from psycopg.pq.abc import PGconn

from klio_common import libpq
from klio_wal_receiver.segments import SegmentWriter

if TYPE_CHECKING:
    from klio_common.partial import PartialWriter
    from klio_wal_receiver._turn import Turn

_turn: ModuleType | None
try:
    from klio_wal_receiver import _turn
except ImportError:  # not built: no compiler or headers where the package was installed
    _turn = None

ENV = "KLIO_NATIVE_TURN"  # "0" turns it off (the Python loop)

STATE, STOP, END, BROKEN, SLOW, NOFAST, IOERR, PENDING = range(8)


def built() -> bool:
    """Whether the native turn was compiled with this package."""
    return _turn is not None


class NativeTurn:
    """Turns of one replication connection in native code; Python keeps the state between.

    Use `create`, then `run` whenever `SegmentWriter.native_tail` allows it.
    """

    def __init__(self, turn: Turn) -> None:
        self._t = turn
        self._keyed: PartialWriter | None = None  # whose frames the turn seals (its key)

    @classmethod
    def create(
        cls, pg: PGconn, wake: int, interval: float, state_every: float
    ) -> NativeTurn | None:
        """A native turn for ``pg``; None where it was not built, is turned off, or psycopg's
        libpq cannot be found."""
        if _turn is None or os.environ.get(ENV, "1") == "0":
            return None
        found = libpq.addresses(pg)
        if found is None:
            return None
        turn = _turn.Turn()
        turn.connect(*found)
        turn.sock, turn.wake, turn.interval = pg.socket, wake, interval
        turn.state_every = state_every
        return cls(turn)

    def run(
        self,
        writer: SegmentWriter,
        reported: int,
        last_status: float,
        last_state: float,
    ) -> tuple[int, bytes | None, tuple[int, float, float, int, int, int]] | None:
        """Make turns until one needs Python; None when none can be made natively now.

        Returns:
            The reason (`STATE`, `STOP`, `END`, `BROKEN`, `SLOW` with the message Python must
            handle, `NOFAST`, `PENDING`), the message, and the loop's state after it:
            ``(reported, last_status, last_state, WAL bytes received, server's WAL end,
            flushes made)``.

        Raises:
            KlioError, OSError: the append to the ``.partial`` failed (it refuses further use).
        """
        found = writer.native_tail()
        if found is None:
            return None
        buf, tail, base, received, verify_until = found
        t = self._t
        if self._keyed is not tail.writer:  # every writer has its own data key
            t.key(tail.key or b"", tail.prefix, tail.digest)
            self._keyed = tail.writer
        start, fill = tail.direct.where()
        values = {
            "dfd": tail.direct.fd,
            "base": base,
            "seg_size": writer.seg_size,
            "received": received,
            "submitted": received,  # native_tail: nothing received is waiting for an append
            "verify_until": verify_until,
            "file_size": tail.size,
            "allocated": tail.allocated,
            "index": tail.index,
            "frame_size": tail.frame_size,
            "capacity": tail.capacity,
            "tail_start": start,
            "tail_fill": fill,
            "durable": writer.durable,
            "reported": reported,
            "last_status": last_status,
            "last_state": last_state,
            "nbytes": 0,
            "wal_end": 0,
        }
        for name, value in values.items():
            setattr(t, name, value)
        code, msg = t.run(buf, tail.direct.buffer)
        # what the turns did, back into the objects (the file, the tail block, the positions)
        tail.writer.synced_natively(t.index, t.file_size)
        tail.direct.moved(t.tail_start, t.tail_fill)
        writer.advanced(t.received, t.submitted)
        if code == IOERR:
            raise tail.writer.failed_natively(OSError(t.err, os.strerror(t.err)))
        flushes = t.index - tail.index
        return code, msg, (t.reported, t.last_status, t.last_state, t.nbytes, t.wal_end, flushes)
