"""A replication connection over ``psycopg.pq``, non-blocking on asyncio (WAL, BASE_BACKUP).

Every libpq call here is non-blocking (pitfall P1: a blocking call holds the GIL and freezes the
process): connecting uses ``connect_start``/``connect_poll``, commands use ``send_query`` and
``consume_input`` while the socket is readable, and COPY data is drained with ``get_copy_data(1)``.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo
from psycopg.pq.abc import PGconn, PGresult

from klio_common import libpq
from klio_common.errors import KlioError, Permanent, Retryable, UnsupportedServer
from klio_common.pg.lsn import Lsn
from klio_common.sockwait import ReadWatch, wait_fd

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since the Unix epoch


def pg_now_us() -> int:
    """Microseconds since 2000-01-01 UTC, the replication protocol's clock."""
    return time.time_ns() // 1000 - PG_EPOCH_US


@dataclass(frozen=True)
class XLogData:
    """A 'w' message: WAL bytes starting at ``start``.

    ``data`` is lent from libpq's buffer: valid until the next `read_message`, copy it first.
    """

    start: int
    wal_end: int
    send_time: int
    data: memoryview


@dataclass(frozen=True)
class Keepalive:
    """A 'k' message."""

    wal_end: int
    send_time: int
    reply_requested: bool


class StreamEnded(Exception):
    """The server ended the COPY (timeline end or shutdown); ``next_timeline`` for the former."""

    def __init__(self, next_timeline: int | None, next_start: int | None) -> None:
        super().__init__(f"stream ended (next timeline {next_timeline})")
        self.next_timeline = next_timeline
        self.next_start = next_start


class ServerError(Retryable):
    """An error reported by the server; ``sqlstate`` and the raw message are kept."""

    def __init__(self, message: str, sqlstate: str | None, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.sqlstate = sqlstate


def _result_error(res: PGresult, what: str) -> ServerError:
    msg = (res.error_message or b"").decode(errors="replace").strip()
    state = res.error_field(pq.DiagnosticField.SQLSTATE)
    return ServerError(f"{what} failed: {msg}", state.decode() if state else None)


def result_error(res: PGresult, what: str) -> ServerError:
    """The error a failed result reports, as ``"<what> failed: <server message>"``."""
    return _result_error(res, what)


def result_rows(res: PGresult) -> list[list[str | None]]:
    """The rows of a TUPLES_OK result as text (None for NULL)."""
    return [
        [None if (v := res.get_value(r, c)) is None else v.decode() for c in range(res.nfields)]
        for r in range(res.ntuples)
    ]


def classify_connect_error(message: str, where: str) -> KlioError:
    """Turn a libpq connection failure into an error that names the problem and a hint."""
    text = message.strip()
    low = text.lower()
    if "must be superuser or replication role" in low or "permission denied to start wal" in low:
        return Permanent(
            f"cannot stream WAL from {where}: the role lacks the REPLICATION attribute ({text})",
            hint="ALTER ROLE <user> REPLICATION; or use a role that has it",
        )
    if "exceeds max_wal_senders (currently 0)" in low or "wal_level" in low:
        return UnsupportedServer(
            f"cannot stream WAL from {where}: the server does not allow replication ({text})",
            hint="set wal_level = replica (or logical) and max_wal_senders > 0, then restart "
            "PostgreSQL",
        )
    if "no pg_hba.conf entry for replication" in low:
        return Permanent(
            f"cannot stream WAL from {where}: pg_hba.conf has no replication entry ({text})",
            hint="add a 'host replication <user> <address> scram-sha-256' line and reload",
        )
    if "password authentication failed" in low:
        return Permanent(
            f"cannot connect to {where}: password authentication failed",
            hint="check password_file and the role's password",
        )
    return Retryable(
        f"cannot connect to {where}: {text}",
        hint="check that PostgreSQL is running and the conninfo is right; retrying",
    )


class ReplicationConnection:
    """One ``replication=true`` connection; commands and COPY_BOTH streaming."""

    def __init__(self, conn: PGconn, where: str) -> None:
        self.conn = conn
        self.where = where
        self._loop = asyncio.get_running_loop()
        self._watch: ReadWatch | None = None  # while streaming: see `wait_readable`
        self.reader = libpq.CopyReader(conn)  # WAL messages, lent without a copy

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    @classmethod
    async def connect(
        cls, conninfo: str, *, application_name: str, password: str | None, timeout: float = 10.0
    ) -> ReplicationConnection:
        """Connect without blocking the event loop.

        Raises:
            Permanent: wrong role, password or pg_hba; UnsupportedServer: replication disabled.
            Retryable: the server is unreachable.
        """
        params: dict[str, str] = {"replication": "true", "application_name": application_name}
        if password is not None:
            params["password"] = password
        params.setdefault("connect_timeout", str(max(1, int(timeout))))
        full = make_conninfo(conninfo, **params)
        conn = pq.PGconn.connect_start(full.encode())
        where = _describe(conn)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                status = conn.connect_poll()
                if status == pq.PollingStatus.OK:
                    break
                if status == pq.PollingStatus.FAILED:
                    raise classify_connect_error(conn.error_message.decode(errors="replace"), where)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise Retryable(
                        f"cannot connect to {where}: timed out after {timeout:.0f} s",
                        hint="check that PostgreSQL is reachable from here; retrying",
                    )
                await wait_fd(conn.socket, status == pq.PollingStatus.WRITING, remaining)
        except BaseException:
            conn.finish()
            raise
        conn.nonblocking = 1
        return cls(conn, where)

    @property
    def server_version(self) -> int:
        """server_version_num of the peer."""
        return int(self.conn.server_version)

    def parameter(self, name: str) -> str | None:
        """A parameter reported by the server at startup (e.g. ``server_version``)."""
        value = self.conn.parameter_status(name.encode())
        return value.decode() if value is not None else None

    def close(self) -> None:
        """Close the socket (no goodbye needed for a replication connection)."""
        self._unwatch()
        self.reader.release()
        self.conn.finish()

    def detach(self) -> PGconn:
        """The libpq connection, for a caller that drives the COPY on a thread of its own.

        The loop stops watching the socket; until the caller is done, only it may use the
        connection, and only with non-blocking calls (pitfall P1).
        """
        self._unwatch()
        return self.conn

    async def _flush(self) -> None:
        while self.conn.flush() == 1:
            await wait_fd(self.conn.socket, True, None)

    async def _next_result(self) -> PGresult | None:
        self._unwatch()  # one reader per socket: this wait registers its own
        while True:
            self.consume_input()
            if not self.conn.is_busy():
                return self.conn.get_result()
            await wait_fd(self.conn.socket, False, None)

    async def command(self, sql: str) -> list[list[str | None]]:
        """Run a replication command; return its rows as text (the last result set's)."""
        self.conn.send_query(sql.encode())
        await self._flush()
        rows: list[list[str | None]] = []
        error: ServerError | None = None
        while (res := await self._next_result()) is not None:
            status = pq.ExecStatus(res.status)
            if status == pq.ExecStatus.TUPLES_OK:
                rows = result_rows(res)
            elif status != pq.ExecStatus.COMMAND_OK and error is None:
                error = _result_error(res, sql.split()[0])
        if error is not None:
            raise error
        return rows

    async def send(self, sql: str) -> None:
        """Send a command whose results the caller reads with `next_result` (e.g. BASE_BACKUP).

        Read every result up to None before the next command (pitfall P3).
        """
        self.conn.send_query(sql.encode())
        await self._flush()

    async def next_result(self) -> PGresult | None:
        """The next result of the command in progress, or None once it is complete.

        Raises:
            Retryable: the connection was lost.
        """
        return await self._next_result()

    def read_copy(self) -> tuple[str, memoryview] | None:
        """One buffered COPY_OUT message as (type letter, payload), None when none is buffered.

        BASE_BACKUP's messages are ``n`` (new archive), ``d`` (data), ``p`` (progress) and ``m``
        (manifest follows). When None, wait with ``wait_readable``.

        Raises:
            StreamEnded: the server sent CopyDone; read what follows with `next_result`.
            Retryable: the connection broke.
        """
        mv = self._copy_data("COPY stream")
        return None if mv is None else (chr(mv[0]), mv[1:])

    def _copy_data(self, what: str, *, lent: bool = False) -> memoryview | None:
        """One buffered CopyData message, or None when nothing is buffered.

        With ``lent``, the message is libpq's own buffer, valid until the next read
        (`libpq.CopyReader`); otherwise a copy the caller may keep.

        Raises:
            StreamEnded: the server sent CopyDone.
            Retryable: the connection broke.
        """
        try:
            if lent:
                nbytes, view = self.reader.read()
            else:
                nbytes, raw = self.conn.get_copy_data(1)
                view = memoryview(raw) if nbytes > 0 else None
        except psycopg.OperationalError as exc:
            raise self._broken(what, str(exc)) from exc
        if view is not None:
            return view
        if nbytes == 0:
            return None
        if nbytes == -1:
            raise StreamEnded(None, None)
        raise self._broken(what, self.conn.error_message.decode(errors="replace"))

    def _broken(self, what: str, detail: str) -> Retryable:
        return Retryable(
            f"{what} from {self.where} broke: {detail.strip()}", hint="retrying with backoff"
        )

    def consume_input(self) -> None:
        """Read whatever the socket holds now, without waiting (then try `read_copy` again).

        Raises:
            Retryable: the connection was lost.
        """
        try:
            libpq.consume_input(self.conn)  # without the GIL: see klio_common.libpq
        except psycopg.OperationalError as exc:
            raise Retryable(
                f"connection to {self.where} lost: {str(exc).strip()}",
                hint="retrying with backoff",
            ) from exc

    async def start_replication(self, slot: str | None, start: int, timeline: int) -> None:
        """Send START_REPLICATION and wait for COPY_BOTH (some errors arrive later, P8)."""
        slot_part = f"SLOT {slot} " if slot else ""
        sql = f"START_REPLICATION {slot_part}PHYSICAL {Lsn(start)} TIMELINE {timeline}"
        self.conn.send_query(sql.encode())
        await self._flush()
        res = await self._next_result()
        if res is None:
            raise ServerError("START_REPLICATION returned no result", None)
        if pq.ExecStatus(res.status) != pq.ExecStatus.COPY_BOTH:
            error = _result_error(res, "START_REPLICATION")
            while await self._next_result() is not None:
                pass
            raise error

    def read_message(self) -> XLogData | Keepalive | None:
        """One buffered message, or None when nothing is buffered (then ``wait_readable``).

        Raises:
            StreamEnded: the server sent CopyDone (caller must ``finish_copy``).
        """
        mv = self._copy_data("replication stream", lent=True)
        if mv is None:
            return None
        kind = mv[0]
        if kind == 0x77:  # 'w'
            start, wal_end, send_time = struct.unpack_from("!QQq", mv, 1)
            return XLogData(start, wal_end, send_time, self.reader.lend(mv[25:]))
        if kind == 0x6B:  # 'k'
            wal_end, send_time, reply = struct.unpack_from("!QqB", mv, 1)
            return Keepalive(wal_end, send_time, bool(reply))
        return None  # unknown message types are ignored, as walreceiver does

    async def wait_readable(
        self, timeout: float | None, interrupt: asyncio.Future[object] | None = None
    ) -> None:
        """Wait for data, ``timeout`` or ``interrupt``; then read what arrived.

        The socket stays registered with the event loop from the first call until the stream
        ends (`finish_copy`, `close`): one registration per stream, not per message.
        """
        if self._watch is None:
            self._watch = ReadWatch(self.conn.socket)
        if await self._watch.wait(timeout, interrupt):
            self.consume_input()

    async def send_status(self, write: int, flush: int, reply: bool = False) -> None:
        """Send a standby status update ('r'): write/flush positions, apply unknown (0)."""
        msg = b"r" + struct.pack("!QQQqB", write, flush, 0, pg_now_us(), 1 if reply else 0)
        if self.conn.put_copy_data(msg) != 1:
            raise Retryable(
                f"cannot send status to {self.where}: "
                f"{self.conn.error_message.decode(errors='replace').strip()}"
            )
        await self._flush()

    async def finish_copy(self) -> StreamEnded:
        """Answer the server's CopyDone and read what follows (next timeline, P6)."""
        self.reader.release()
        try:
            self.conn.put_copy_end()
            await self._flush()
        except psycopg.OperationalError:
            pass  # the server ended the COPY with an error (P8): the result below says which
        next_tli: int | None = None
        next_start: int | None = None
        error: ServerError | None = None
        while (res := await self._next_result()) is not None:
            status = pq.ExecStatus(res.status)
            if status == pq.ExecStatus.TUPLES_OK and res.ntuples == 1 and res.nfields >= 2:
                tli_raw, pos_raw = res.get_value(0, 0), res.get_value(0, 1)
                if tli_raw is not None and pos_raw is not None:
                    next_tli = int(tli_raw.decode())
                    next_start = int(Lsn.parse(pos_raw.decode()))
            elif status == pq.ExecStatus.COPY_OUT or status == pq.ExecStatus.COPY_BOTH:
                continue
            elif status == pq.ExecStatus.FATAL_ERROR and error is None:
                error = _result_error(res, "replication")
        if error is not None:
            raise error
        return StreamEnded(next_tli, next_start)


def _describe(conn: PGconn) -> str:
    try:
        host = (conn.host or b"").decode() or "localhost"
        port = (conn.port or b"").decode() or "5432"
    except Exception:  # pragma: no cover - libpq always reports host/port after connect_start
        return "PostgreSQL"
    return f"PostgreSQL at {host}:{port}"
