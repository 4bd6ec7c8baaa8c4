"""A synchronous standby's streaming loop: its own thread, ``poll()``, no event loop in between.

A synchronous standby's commit latency is the length of one turn of its loop: receive the WAL,
append it to the ``.partial``, fsync, report the flush position. On asyncio each turn also pays an
event-loop iteration, a future, a timer and a task step, and they cost as much CPU as the work
itself — CPU that, on a small node, the primary's backends are waiting for. `SyncPump` runs that
loop on a thread of its own with the same non-blocking libpq calls (pitfall P1: never a blocking
libpq call, which would hold the GIL) and waits in ``poll()``, which releases the GIL.

While the pump runs, it alone touches the connection and the segment writer; the event loop only
waits for it to end. It ends when the server ends the COPY (the caller then answers with
``finish_copy`` on the loop), when `stop` is called, or with the first error.
"""

from __future__ import annotations

import os
import select
import struct
import time

import psycopg
from psycopg.pq.abc import PGconn

from klio_common.errors import Retryable
from klio_common.replication import ReplicationConnection, pg_now_us
from klio_wal_receiver.segments import SegmentWriter
from klio_wal_receiver.state import ReceiverState

_XLOG = struct.Struct("!QQq")  # 'w': start, wal end, send time
_KEEPALIVE = struct.Struct("!QqB")  # 'k': wal end, send time, reply requested
_STATUS = struct.Struct("!cQQQqB")  # 'r': write, flush, apply, now, reply requested
_HINT = "retrying with backoff"


class SyncPump:
    """Streams WAL from ``conn`` into ``writer`` until the COPY ends or `stop` is called.

    Args:
        conn: a connection in COPY_BOTH (START_REPLICATION done).
        writer: the segment writer; flushed (fsynced) before every flush report.
        state: the receiver's status and metrics.
        interval: seconds between status reports when nothing else prompts one.
    """

    def __init__(
        self,
        conn: ReplicationConnection,
        writer: SegmentWriter,
        state: ReceiverState,
        interval: float,
    ) -> None:
        self.conn = conn
        self.writer = writer
        self.state = state
        self.interval = interval
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False

    def stop(self) -> None:
        """Ask the pump to end after its current turn (any thread; idempotent)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the pump is already woken

    def close(self) -> None:
        """Release the wake-up pipe (after `run` returned)."""
        os.close(self._wake_r)
        os.close(self._wake_w)

    def run(self) -> bool:
        """Stream; return True when the server ended the COPY, False when stopped.

        Raises:
            Retryable: the connection broke or a status could not be sent.
            KlioError: from the writer (a conflict, a full disk...).
        """
        pg = self.conn.detach()
        writer, state = self.writer, self.state
        reader, put_copy_data = self.conn.reader, pg.put_copy_data
        read, lend = reader.read, reader.lend
        poller = select.poll()
        poller.register(pg.socket, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        interval_ms = max(1, int(self.interval * 1000))
        reported = -1
        last_status = time.monotonic()
        nbytes = 0
        wal_end = 0
        while not self._stopping:
            reply = False
            while True:
                try:
                    size, buf = read()  # lent by libpq until the next read: put() copies it
                except psycopg.OperationalError as exc:
                    raise self._broken(str(exc)) from exc
                if buf is None:
                    break
                kind = buf[0]
                if kind == 0x77:  # 'w'
                    start, end, _ = _XLOG.unpack_from(buf, 1)
                    writer.put(start, lend(buf[25:]))
                    nbytes += size - 25
                    wal_end = max(wal_end, end)
                elif kind == 0x6B:  # 'k'
                    end, _, asked = _KEEPALIVE.unpack_from(buf, 1)
                    wal_end = max(wal_end, end)
                    reply = reply or bool(asked)
            if size == -1:
                return True  # CopyDone: the caller answers it (finish_copy) on the loop
            if size < -1:
                raise self._broken(pg.error_message.decode(errors="replace"))
            if nbytes:
                state.received(nbytes, wal_end)
                nbytes = 0
            durable = writer.flush_here() if writer.received > writer.durable else writer.durable
            now = time.monotonic()
            if reply or durable != reported or now - last_status >= self.interval:
                received = writer.received
                msg = _STATUS.pack(b"r", received, durable, 0, pg_now_us(), 0)
                if put_copy_data(msg) != 1:
                    raise self._broken(pg.error_message.decode(errors="replace"))
                self._flush(pg)
                reported, last_status = durable, now
                state.flushed(durable, received)
                self.conn.consume_input()  # WAL that arrived meanwhile: take it before sleeping
                continue
            timeout = interval_ms - int((now - last_status) * 1000)
            if poller.poll(max(1, timeout)):
                self.conn.consume_input()
        return False

    def _flush(self, pg: PGconn) -> None:
        while (pending := pg.flush()) == 1:  # the socket's buffer is full: wait until it drains
            select.select([], [pg.socket], [], 1.0)
        if pending != 0:
            raise self._broken(pg.error_message.decode(errors="replace"))

    def _broken(self, detail: str) -> Retryable:
        return Retryable(
            f"replication stream from {self.conn.where} broke: {detail.strip()}", hint=_HINT
        )
