"""libpq's ``PQconsumeInput`` without the GIL, and ``PQgetCopyData`` without a copy.

psycopg's compiled implementations (``psycopg[binary]``, ``psycopg[c]``) call ``PQconsumeInput``
with the GIL held. That call is a ``recv`` plus a copy into libpq's buffer, and a WAL or
BASE_BACKUP stream makes it for every few hundred KiB: profiles of a base backup found the
event loop holding the GIL in it for a quarter of the time anyone held it, while the chunk
workers (zstd, SHA-256, AES-GCM, which release the GIL) waited to get it back.

Here the same function of the same library (the libpq psycopg has loaded, found in the process's
memory map and bound with ``RTLD_NOLOAD``, so never a second copy) is called through ctypes,
which releases the GIL for the call. Only the thread that owns the connection calls it, as
before. Where the library cannot be found unambiguously, psycopg's own call is used.

`CopyReader` reads COPY messages the same way, and lends each one as a memoryview of the buffer
libpq allocated for it (freed at the next read): psycopg's ``get_copy_data`` copies every message
into a new ``bytes``, a third copy of each WAL byte (socket, libpq, bytes) before the receiver
copies it into its segment, and a malloc of up to 128 KiB per message whose pages fault in anew.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

import psycopg
from psycopg.pq.abc import PGconn

_lock = threading.Lock()
_resolved = False
_consume: Any = None  # the ctypes function, or None: use psycopg's
_copy_fns: tuple[Any, Any] | None = None  # PQgetCopyData, PQfreemem, or None: use psycopg's
_send_fns: tuple[Any, Any] | None = None  # PQputCopyData, PQflush (for `addresses` only)
_PYBUF_READ = 0x100
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_memory_view.restype = ctypes.py_object


def consume_input(conn: PGconn) -> None:
    """``conn.consume_input()``, without the GIL where possible.

    Raises:
        psycopg.OperationalError: the connection is broken (as psycopg raises it).
    """
    fn = _consume if _resolved else _resolve()
    ptr = getattr(conn, "pgconn_ptr", None)  # every psycopg implementation has it
    if fn is None or ptr is None:
        conn.consume_input()
        return
    if fn(ptr) != 1:
        raise _consume_failed(conn)


def _consume_failed(conn: PGconn) -> psycopg.OperationalError:
    message = conn.error_message.decode(errors="replace").strip()
    return psycopg.OperationalError(f"consuming input failed: {message}")


def loaded_libpq(maps: str) -> str | None:
    """The one libpq shared object in a ``/proc/<pid>/maps`` text, or None (none, or several)."""
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith("libpq") and ".so" in fields[5]:
            found.add(fields[5])
    return found.pop() if len(found) == 1 else None


def addresses(conn: PGconn) -> tuple[int, int, int, int, int, int] | None:
    """The addresses of ``conn``'s PGconn and of its libpq's ``PQgetCopyData``, ``PQfreemem``,
    ``PQconsumeInput``, ``PQputCopyData`` and ``PQflush``, for native code; None where the
    library psycopg loaded cannot be found unambiguously."""
    if not _resolved:
        _resolve()
    ptr = getattr(conn, "pgconn_ptr", None)
    if ptr is None or _copy_fns is None or _consume is None or _send_fns is None:
        return None
    fns = (*_copy_fns, _consume, *_send_fns)
    return (ptr, *(ctypes.cast(fn, ctypes.c_void_p).value or 0 for fn in fns))


class CopyReader:
    """``get_copy_data(1)`` of one connection, lending each message instead of copying it.

    The view `read` returns is valid until the next `read` or `release`, which free it (and
    release the view, so a late use raises instead of reading freed memory): consume or copy
    it before then. A slice of it handed on must be registered with `lend`, so that it is
    released too. Only the thread that owns the connection may use the reader.
    """

    def __init__(self, conn: PGconn) -> None:
        self.conn = conn
        if not _resolved:
            _resolve()
        self._ptr = getattr(conn, "pgconn_ptr", None)  # every psycopg implementation has it
        self._fns = _copy_fns if self._ptr is not None else None
        self._consume = _consume if self._ptr is not None else None
        self._out = ctypes.c_void_p()
        self._out_ref = ctypes.byref(self._out)
        self._held: int | None = None  # libpq's buffer behind the lent view
        self._lent: list[memoryview] = []  # the message's view and slices of it handed on

    def read(self) -> tuple[int, memoryview | None]:
        """``(size, message)``; ``size`` is 0 (nothing buffered), -1 (CopyDone) or -2 (error).

        Raises:
            psycopg.OperationalError: psycopg's own call failed (fallback only).
        """
        if self._lent:
            self.release()
        fns = self._fns
        if fns is None:
            size, buf = self.conn.get_copy_data(1)
            return size, (memoryview(buf) if size > 0 else None)
        size = fns[0](self._ptr, self._out_ref, 1)
        if size <= 0:
            return size, None
        self._held = held = self._out.value
        view: memoryview = _memory_view(held, size, _PYBUF_READ)
        self._lent.append(view)
        return size, view

    def consume(self) -> None:
        """`consume_input` of this reader's connection (the pointer looked up once).

        Raises:
            psycopg.OperationalError: the connection is broken.
        """
        if self._consume is None:
            self.conn.consume_input()
        elif self._consume(self._ptr) != 1:
            raise _consume_failed(self.conn)

    def lend(self, view: memoryview) -> memoryview:
        """Register a slice of the current message, to be released with it; return it."""
        if self._held is not None:
            self._lent.append(view)
        return view

    def release(self) -> None:
        """Free the message lent last (idempotent)."""
        for view in self._lent:
            view.release()
        self._lent.clear()
        if self._held is not None:
            assert self._fns is not None
            self._fns[1](self._held)
            self._held = None


def _resolve() -> Any:
    global _resolved, _consume, _copy_fns, _send_fns
    with _lock:
        if not _resolved:
            lib = _library()
            _consume = _bind(lib, "PQconsumeInput", [ctypes.c_void_p], ctypes.c_int)
            get = _bind(
                lib,
                "PQgetCopyData",
                [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
                ctypes.c_int,
            )
            free = _bind(lib, "PQfreemem", [ctypes.c_void_p], None)
            _copy_fns = (get, free) if get is not None and free is not None else None
            put = _bind(
                lib, "PQputCopyData", [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int], ctypes.c_int
            )
            flush = _bind(lib, "PQflush", [ctypes.c_void_p], ctypes.c_int)
            _send_fns = (put, flush) if put is not None and flush is not None else None
            _resolved = True
    return _consume


def _library() -> ctypes.CDLL | None:
    try:
        path = loaded_libpq(Path("/proc/self/maps").read_text())
    except OSError:
        return None
    if path is None:
        return None
    try:
        return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None


def _bind(lib: ctypes.CDLL | None, name: str, argtypes: list[Any], restype: Any) -> Any:
    if lib is None:
        return None
    try:
        fn = getattr(lib, name)
    except AttributeError:
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn
