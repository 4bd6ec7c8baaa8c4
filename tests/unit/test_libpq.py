"""PQconsumeInput without the GIL: finding psycopg's libpq, and falling back without it."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from klio_common import libpq

MAPS = """\
7f00-7f01 r--p 00000000 fd:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 r-xp 00001000 fd:01 2 /venv/site-packages/psycopg_binary.libs/libpq-e9b5.so.5.18
7f03-7f04 r--p 00002000 fd:01 2 /venv/site-packages/psycopg_binary.libs/libpq-e9b5.so.5.18
7f05-7f06 rw-p 00000000 00:00 0
7f07-7f08 r--p 00000000 fd:01 3 /usr/lib/libpqwalreceiver-notes.txt
"""


def test_the_one_loaded_libpq_is_found() -> None:
    assert libpq.loaded_libpq(MAPS) == "/venv/site-packages/psycopg_binary.libs/libpq-e9b5.so.5.18"


def test_two_libpqs_or_none_mean_psycopgs_own_call() -> None:
    two = MAPS + "7f09-7f0a r-xp 0 fd:01 4 /usr/lib/x86_64-linux-gnu/libpq.so.5.15\n"
    assert libpq.loaded_libpq(two) is None
    assert libpq.loaded_libpq("7f00-7f01 r--p 0 fd:01 1 /usr/lib/libc.so.6\n") is None


def test_psycopgs_libpq_is_bound_here() -> None:
    assert psycopg.pq.__impl__ in ("binary", "c", "python")
    assert libpq._resolve() is not None


class _Conn:
    """A closed connection as psycopg presents it: no pointer, its own call raises."""

    pgconn_ptr: Any = None
    error_message = b"connection pointer is NULL"

    def consume_input(self) -> None:
        raise psycopg.OperationalError("consuming input failed: connection pointer is NULL")


def test_a_closed_connection_raises_as_psycopg_does() -> None:
    with pytest.raises(psycopg.OperationalError, match="consuming input failed"):
        libpq.consume_input(_Conn())  # type: ignore[arg-type]


def test_the_readers_consume_raises_for_a_connection_that_is_not_open() -> None:
    conn = psycopg.pq.PGconn.connect_start(b"host=/nonexistent-klio-socket-dir port=1")
    try:
        assert getattr(conn, "pgconn_ptr", None) is not None  # libpq's own call: the cached pointer
        with pytest.raises(psycopg.OperationalError, match="consuming input failed") as info:
            libpq.CopyReader(conn).consume()
        assert "connection not open" in str(info.value)  # libpq's own words, passed on
    finally:
        conn.finish()


class _CopyConn:
    """A connection whose pointer is unknown: the reader uses psycopg's own call."""

    pgconn_ptr: Any = None

    def __init__(self, messages: list[tuple[int, bytes]]) -> None:
        self.messages = messages

    def get_copy_data(self, async_: int) -> tuple[int, bytes]:
        assert async_ == 1  # never a blocking read (P1)
        return self.messages.pop(0)


def test_without_the_pointer_the_reader_returns_psycopgs_copies() -> None:
    reader = libpq.CopyReader(_CopyConn([(5, b"wdata"), (0, b""), (-1, b"")]))  # type: ignore[arg-type]
    size, view = reader.read()
    assert view is not None and (size, bytes(view)) == (5, b"wdata")
    tail = reader.lend(view[1:])
    assert reader.read() == (0, None)
    assert (bytes(view), bytes(tail)) == (b"wdata", b"data")  # psycopg's copies stay valid
    assert reader.read() == (-1, None)
    reader.release()
    reader.release()  # idempotent
