"""The native turn's contract (`_turn.c`), driven through scripted libpq functions.

The C loop calls libpq through function addresses; here they are ctypes callbacks that play a
script of COPY messages, so each way out of the loop is reached deterministically: frames that
`read_partial` reads back exactly, the status replies, and the hand-backs to Python (a message
it does not place, an append it does not make, a failed write, a stop, the end of the COPY).
The real stream is tested in tests/wal_receiver/test_native_turn.py.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from klio_common.compression import get as codec
from klio_common.crypto import KeyRing
from klio_common.partial import PartialWriter, SyncTail, read_partial
from klio_wal_receiver import native

if TYPE_CHECKING:
    from klio_wal_receiver._turn import Turn

SEG = 1 << 20
BASE = 5 * SEG  # the open segment's first LSN
_GET = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int
)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_ONE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_PUT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


@dataclass
class Script:
    """libpq's side: COPY messages to hand out (None: nothing buffered; an int: that result)."""

    messages: list[bytes | int | None]
    sent: list[bytes] = field(default_factory=list)
    held: list[ctypes.Array[ctypes.c_char]] = field(default_factory=list)

    def get(self, _conn: int, out: ctypes._Pointer[ctypes.c_void_p], _async: int) -> int:
        item = self.messages.pop(0) if self.messages else None
        if item is None or isinstance(item, int):
            return item or 0
        buf = ctypes.create_string_buffer(item, len(item))
        self.held.append(buf)  # kept alive: the C code reads (and frees) it after we return
        out[0] = ctypes.cast(buf, ctypes.c_void_p)
        return len(item)

    def put(self, _conn: int, data: int, size: int) -> int:
        self.sent.append(ctypes.string_at(data, size))
        return 1


def xlog(start: int, data: bytes) -> bytes:
    return b"w" + struct.pack("!QQq", start, start + len(data), 0) + data


def status(sent: bytes) -> tuple[int, int]:
    assert sent[:1] == b"r" and len(sent) == 34
    written, flushed = struct.unpack_from("!QQ", sent, 1)
    return written, flushed


KEYRING = KeyRing("k1", {"k1": bytes(range(32))})


@pytest.fixture(params=["sealed", "plain"])
def partial(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PartialWriter]:
    # sealed: AES-256-GCM frames; plain: without encryption, the CRC-32 covers the payload
    keyring = KEYRING if request.param == "sealed" else KeyRing.none()
    writer = PartialWriter.create(
        tmp_path / "seg.partial",
        name="seg",
        codec=codec("none"),
        keyring=keyring,
        preallocate=SEG + (1 << 20),
        direct=True,
    )
    writer.append(0, b"\x01" * 100)  # the first append publishes the file (Python's path)
    writer.sync()
    with writer:
        yield writer


def turn_for(tail: SyncTail, script: Script, wake: int, sock: int) -> tuple[Turn, list[Any]]:
    fns: list[Any] = [
        _GET(script.get),
        _FREE(lambda _p: None),
        _ONE(lambda _c: 1),
        _PUT(script.put),
    ]
    fns.append(_ONE(lambda _c: 0))
    assert native._turn is not None
    t: Turn = native._turn.Turn()
    get, free, consume, put, flush = (ctypes.cast(f, ctypes.c_void_p).value or 0 for f in fns)
    t.connect(1, get, free, consume, put, flush)
    t.key(tail.key or b"", tail.prefix, tail.digest)
    start, fill = tail.direct.where()
    values = dict(
        sock=sock, wake=wake, dfd=tail.direct.fd, base=BASE, seg_size=SEG, received=100,
        submitted=100, verify_until=0, file_size=tail.size, allocated=tail.allocated,
        index=tail.index, frame_size=1 << 16, capacity=tail.capacity, tail_start=start,
        tail_fill=fill, durable=BASE + 100, reported=BASE + 100, wal_end=0, nbytes=0,
        interval=3600.0, last_status=1e12, last_state=1e12, state_every=3600.0,
    )  # fmt: skip
    for name, value in values.items():
        setattr(t, name, value)
    return t, fns  # the callbacks must outlive the turn's use of them


@pytest.fixture
def pipes() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def test_frames_read_back_and_each_flush_is_reported(
    partial: PartialWriter, pipes: tuple[int, int]
) -> None:
    assert native.built()
    tail = partial.sync_tail()
    assert tail is not None, "this file system takes O_DIRECT"
    size = partial.path.stat().st_size
    buf = bytearray(SEG)
    buf[:100] = b"\x01" * 100
    pieces = [os.urandom(n) for n in (700, 4096, 5000, 1)]
    messages: list[bytes | int | None] = []
    at = 100
    for piece in pieces:
        messages += [xlog(BASE + at, piece), None]  # one commit per turn
        at += len(piece)
    script = Script([*messages, -1])
    t, _keep = turn_for(tail, script, pipes[0], pipes[0])
    code, msg = t.run(buf, tail.direct.buffer)
    assert (code, msg) == (native.END, None)
    assert t.received == t.submitted == at
    assert t.index == tail.index + len(pieces)
    flushed = [status(s)[1] for s in script.sent]
    ends = [BASE + 100 + sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces))]
    assert flushed == ends  # a reply after each frame's durable write, none before
    tag = 0 if tail.key is None else 16
    assert t.file_size - tail.size == sum(21 + len(p) + tag for p in pieces)
    assert partial.path.stat().st_size == size  # written in the zero-filled space
    partial.synced_natively(t.index, t.file_size)
    tail.direct.moved(t.tail_start, t.tail_fill)
    partial.append_sync(at, memoryview(b"\x02" * 10))  # Python appends after it, as in the pump
    _, plain, valid_end = read_partial(partial.path, KEYRING, source="test")
    assert valid_end == at + 10
    assert bytes(plain) == b"\x01" * 100 + b"".join(pieces) + b"\x02" * 10


def _setup(partial: PartialWriter) -> tuple[SyncTail, bytearray]:
    tail = partial.sync_tail()
    assert tail is not None
    return tail, bytearray(SEG)


def test_what_it_does_not_place_goes_back_to_python(
    partial: PartialWriter, pipes: tuple[int, int]
) -> None:
    tail, buf = _setup(partial)
    jump = xlog(BASE + 200, b"x" * 10)  # not where the segment stands (100): Python's to judge
    last = xlog(BASE + 100, b"y" * (SEG - 100))  # reaches the segment's end: Python closes it
    for message in (jump, last, b"w" + bytes(10)):  # the last one is too short to parse
        script = Script([message])
        t, _keep = turn_for(tail, script, pipes[0], pipes[0])
        assert t.run(buf, tail.direct.buffer) == (native.SLOW, message)
        assert t.received == t.submitted == 100 and script.sent == []


def test_bytes_to_verify_go_back_to_python(partial: PartialWriter, pipes: tuple[int, int]) -> None:
    tail, buf = _setup(partial)
    message = xlog(BASE + 100, b"z" * 10)
    t, _keep = turn_for(tail, Script([message]), pipes[0], pipes[0])
    t.verify_until = 4096  # a resumed .partial: what is received again must match it
    assert t.run(buf, tail.direct.buffer) == (native.SLOW, message)


def test_an_append_off_the_short_path_goes_back_to_python(
    partial: PartialWriter, pipes: tuple[int, int]
) -> None:
    tail, buf = _setup(partial)
    script = Script([xlog(BASE + 100, b"a" * 64), None])
    t, _keep = turn_for(tail, script, pipes[0], pipes[0])
    t.frame_size = 32  # a batch over a frame: PartialWriter.append_sync splits it
    assert t.run(buf, tail.direct.buffer) == (native.NOFAST, None)
    assert (t.received, t.submitted, t.index) == (164, 100, tail.index)
    assert bytes(buf[100:164]) == b"a" * 64 and script.sent == []


def test_a_failed_write_is_reported_with_its_errno(
    partial: PartialWriter, pipes: tuple[int, int], tmp_path: Path
) -> None:
    tail, buf = _setup(partial)
    script = Script([xlog(BASE + 100, b"b" * 10), None])
    t, _keep = turn_for(tail, script, pipes[0], pipes[0])
    readonly = os.open(tmp_path / "seg.partial", os.O_RDONLY)
    try:
        t.dfd = readonly
        assert t.run(buf, tail.direct.buffer) == (native.IOERR, None)
    finally:
        os.close(readonly)
    assert t.err == errno.EBADF
    assert (t.submitted, t.index, t.tail_start) == (100, tail.index, -1)
    assert script.sent == []  # nothing reported that is not durable


def test_keepalive_reply_stop_and_broken(partial: PartialWriter, pipes: tuple[int, int]) -> None:
    tail, buf = _setup(partial)
    keepalive = b"k" + struct.pack("!QqB", BASE + 500, 0, 1)  # the server asks for a reply
    script = Script([keepalive, None])
    t, _keep = turn_for(tail, script, pipes[0], pipes[0])
    os.write(pipes[1], b"x")  # the wake-up pipe: `SyncPump.stop`
    assert t.run(buf, tail.direct.buffer) == (native.STOP, None)
    assert [status(s) for s in script.sent] == [(BASE + 100, BASE + 100)]
    assert t.wal_end == BASE + 500
    script.messages = [-2]  # PQgetCopyData's error
    assert t.run(buf, tail.direct.buffer) == (native.BROKEN, None)
