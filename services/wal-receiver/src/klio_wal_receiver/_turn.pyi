"""Types of the native turn (`_turn.c`); see `native.py`."""

from mmap import mmap

STATE: int
STOP: int
END: int
BROKEN: int
SLOW: int
NOFAST: int
IOERR: int
PENDING: int

class Turn:
    sock: int
    wake: int
    dfd: int
    err: int
    base: int
    seg_size: int
    received: int
    submitted: int
    verify_until: int
    file_size: int
    allocated: int
    index: int
    frame_size: int
    capacity: int
    tail_start: int
    tail_fill: int
    durable: int
    reported: int
    wal_end: int
    nbytes: int
    interval: float
    last_status: float
    last_state: float
    state_every: float
    def __init__(self) -> None: ...
    def connect(
        self, conn: int, get: int, free: int, consume: int, put: int, flush: int, /
    ) -> None: ...
    def key(self, key: bytes, prefix: bytes, digest: bytes, /) -> None: ...  # key b"": plain
    def run(self, buf: bytearray, tail: mmap, /) -> tuple[int, bytes | None]: ...
