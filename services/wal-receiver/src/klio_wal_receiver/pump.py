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
from klio_common.replication import PG_EPOCH_US, ReplicationConnection
from klio_wal_receiver import native as native_turn
from klio_wal_receiver.segments import SegmentWriter
from klio_wal_receiver.state import ReceiverState

_XLOG = struct.Struct("!QQq")  # 'w': start, wal end, send time
_KEEPALIVE = struct.Struct("!QqB")  # 'k': wal end, send time, reply requested
_STATUS = struct.Struct("!cQQQqB")  # 'r': write, flush, apply, now, reply requested
_HINT = "retrying with backoff"
STATE_EVERY = 0.1  # seconds between updates of the status and metrics while streaming


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
        self._nbytes = 0  # WAL bytes received since the metrics were last brought up to date
        self._wal_end = 0  # the server's WAL end, as last told

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
        try:
            return self._run(pg)
        finally:
            self._publish()

    def _run(self, pg: PGconn) -> bool:
        # Every turn of this loop is one commit's round trip on the primary, and on a small node
        # its CPU comes out of the backends' (its caches are cold after each wait, so every
        # bytecode counts): it stays flat, and the metrics are brought up to date every
        # STATE_EVERY seconds, not at every turn.
        writer, reader = self.writer, self.conn.reader
        read, lend, consume, put = reader.read, reader.lend, reader.consume, writer.put
        flush_here, put_copy_data, pg_flush = writer.flush_here, pg.put_copy_data, pg.flush
        unpack_w, unpack_k, pack_r = _XLOG.unpack_from, _KEEPALIVE.unpack_from, _STATUS.pack
        monotonic, time_ns = time.monotonic, time.time_ns
        poller = select.poll()
        poller.register(pg.socket, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        poll = poller.poll
        interval = self.interval
        interval_ms = max(1, int(interval * 1000))
        reported = -1
        last_status = last_state = monotonic()
        size = 0
        native = native_turn.NativeTurn.create(pg, self._wake_r, interval, STATE_EVERY)
        pending: bytes | None = None  # a message the native turn handed back
        self.state.turn = "python" if native is None else "native"
        while not self._stopping:
            if native is not None and pending is None:
                ran = native.run(writer, reported, last_status, last_state)
                if ran is not None:
                    code, pending, (reported, last_status, last_state, nbytes, end, n) = ran
                    self._nbytes += nbytes
                    self._wal_end = max(self._wal_end, end)
                    self.state.native_flushes.inc(n)
                    if code == native_turn.STATE:
                        self._publish()
                    elif code == native_turn.END:
                        return True  # CopyDone: the caller answers it (finish_copy) on the loop
                    elif code == native_turn.BROKEN:
                        raise self._broken(pg.error_message.decode(errors="replace"))
                    elif code == native_turn.PENDING:
                        self._flush(pg)
                    if code not in (native_turn.SLOW, native_turn.NOFAST):
                        continue  # STOP: the loop's condition ends it; the others: turn on
            reply = False
            msg: memoryview | None = None if pending is None else memoryview(pending)
            pending = None
            try:
                while True:
                    if msg is None:
                        size, msg = read()  # lent by libpq until the next read: put() copies it
                        if msg is None:
                            break
                    if msg[0] == 0x77:  # 'w'
                        start, end, _ = unpack_w(msg, 1)
                        put(start, lend(msg[25:]))
                        self._nbytes += len(msg) - 25
                        if end > self._wal_end:
                            self._wal_end = end
                    elif msg[0] == 0x6B:  # 'k'
                        end, _, asked = unpack_k(msg, 1)
                        if end > self._wal_end:
                            self._wal_end = end
                        reply = reply or bool(asked)
                    msg = None
            except psycopg.OperationalError as exc:
                raise self._broken(str(exc)) from exc
            if size < 0:
                if size == -1:
                    return True  # CopyDone: the caller answers it (finish_copy) on the loop
                raise self._broken(pg.error_message.decode(errors="replace"))
            received = writer.received
            durable = flush_here() if received > writer.durable else writer.durable
            now = monotonic()
            if now - last_state >= STATE_EVERY:
                self._publish()
                last_state = now
            if reply or durable != reported or now - last_status >= interval:
                status = pack_r(b"r", received, durable, 0, time_ns() // 1000 - PG_EPOCH_US, 0)
                if put_copy_data(status) != 1:
                    raise self._broken(pg.error_message.decode(errors="replace"))
                if pg_flush() != 0:
                    self._flush(pg)
                reported, last_status = durable, now
            elif not poll(max(1, interval_ms - int((now - last_status) * 1000))):
                continue  # nothing arrived: the next turn sends the periodic status
            try:
                consume()  # WAL that arrived meanwhile, or that woke the poll
            except psycopg.OperationalError as exc:
                raise self._broken(str(exc)) from exc
        return False

    def _publish(self) -> None:
        """Bring the receiver's status and metrics up to date."""
        writer, state = self.writer, self.state
        if self._nbytes:
            state.received(self._nbytes, self._wal_end)
            self._nbytes = 0
        state.flushed(writer.durable, writer.received)

    def _flush(self, pg: PGconn) -> None:
        while (pending := pg.flush()) == 1:  # the socket's buffer is full: wait until it drains
            select.select([], [pg.socket], [], 1.0)
        if pending != 0:
            raise self._broken(pg.error_message.decode(errors="replace"))

    def _broken(self, detail: str) -> Retryable:
        return Retryable(
            f"replication stream from {self.conn.where} broke: {detail.strip()}", hint=_HINT
        )
