"""libpq's ``PQconsumeInput`` called without holding the GIL.

psycopg's compiled implementations (``psycopg[binary]``, ``psycopg[c]``) call ``PQconsumeInput``
with the GIL held. That call is a ``recv`` plus a copy into libpq's buffer, and a WAL or
BASE_BACKUP stream makes it for every few hundred KiB: profiles of a base backup found the
event loop holding the GIL in it for a quarter of the time anyone held it, while the chunk
workers (zstd, SHA-256, AES-GCM, which release the GIL) waited to get it back.

Here the same function of the same library (the libpq psycopg has loaded, found in the process's
memory map and bound with ``RTLD_NOLOAD``, so never a second copy) is called through ctypes,
which releases the GIL for the call. Only the thread that owns the connection calls it, as
before. Where the library cannot be found unambiguously, psycopg's own call is used.
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
        message = conn.error_message.decode(errors="replace").strip()
        raise psycopg.OperationalError(f"consuming input failed: {message}")


def loaded_libpq(maps: str) -> str | None:
    """The one libpq shared object in a ``/proc/<pid>/maps`` text, or None (none, or several)."""
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and Path(fields[5]).name.startswith("libpq") and ".so" in fields[5]:
            found.add(fields[5])
    return found.pop() if len(found) == 1 else None


def _resolve() -> Any:
    global _resolved, _consume
    with _lock:
        if not _resolved:
            _consume = _bind()
            _resolved = True
    return _consume


def _bind() -> Any:
    try:
        path = loaded_libpq(Path("/proc/self/maps").read_text())
    except OSError:
        return None
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        fn = lib.PQconsumeInput
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn
