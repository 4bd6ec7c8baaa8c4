"""BASE_BACKUP over a replication connection, its tar archives parsed into members on arrival."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Protocol

from psycopg import pq

from klio_common.errors import Permanent
from klio_common.pg.lsn import Lsn
from klio_common.replication import (
    ReplicationConnection,
    ServerError,
    StreamEnded,
    result_error,
    result_rows,
)

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # '7' is a contiguous file, a regular file for our purposes
_DIRECTORY = b"5"
_SYMLINK = b"2"


@dataclass(frozen=True)
class Member:
    """One tar member, its path relative to PGDATA (tablespaces under ``pg_tblspc/<oid>/``)."""

    path: str
    type: str  # "file" | "dir" | "link"
    size: int
    mode: int
    mtime: int
    link_target: str = ""


@dataclass(frozen=True)
class Tablespace:
    """A row of BASE_BACKUP's tablespace result (the main data directory is not one)."""

    oid: int
    location: str
    size: int  # bytes, estimated by the server (PROGRESS)


@dataclass
class BackupPositions:
    """What the server reported around the archives."""

    start_lsn: int = 0
    start_tli: int = 0
    end_lsn: int = 0
    end_tli: int = 0
    tablespaces: list[Tablespace] = field(default_factory=list)
    estimated: int = 0  # bytes of every archive, estimated by the server


class Sink(Protocol):
    """Receives what the stream carries; every call is on the event loop, in stream order."""

    def started(self, positions: BackupPositions) -> None: ...
    def member(self, member: Member) -> None: ...
    def data(self, piece: memoryview) -> None: ...
    def member_end(self) -> None: ...
    def manifest(self, piece: memoryview) -> None: ...
    def progress(self, received: int) -> None: ...
    async def pace(self) -> None: ...


def command(label: str, checkpoint: str) -> str:
    """The BASE_BACKUP command (PostgreSQL 15 option syntax).

    CRC32C manifest checksums: the primary computes them for every file, and SHA-256 there would
    cost the primary's CPU; Klio's own per-file SHA-256 and chunk ids protect the stored copy.
    """
    quoted = label.replace("'", "''")
    return (
        f"BASE_BACKUP (LABEL '{quoted}', PROGRESS, CHECKPOINT '{checkpoint}', WAIT false, "
        "MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP true)"
    )


def _malformed(what: str) -> Permanent:
    return Permanent(
        f"the base backup stream is malformed: {what}",
        hint="check that the server is PostgreSQL 15 or later and not a proxy altering the stream",
    )


def _octal(raw: bytes, what: str) -> int:
    if raw and raw[0] & 0x80:  # base-256 (GNU) for values that do not fit in octal
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise _malformed(f"bad {what} field {raw!r} in a tar header") from None


def _clean(path: str) -> str:
    path = path.removeprefix("./").rstrip("/")
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise _malformed(f"unsafe member path {path!r}")
    return path


class TarReader:
    """A streaming ustar parser: feed bytes as they come, members go to the sink.

    Args:
        sink: receives ``member``, ``data`` and ``member_end`` calls.
        prefix: prepended to member paths (``pg_tblspc/<oid>/`` for a tablespace archive).
        archive: the archive's name, for error messages.
    """

    def __init__(self, sink: Sink, prefix: str, archive: str) -> None:
        self.sink = sink
        self.prefix = prefix
        self.archive = archive
        self._header = bytearray()
        self._remaining = 0  # data bytes of the current member still to come
        self._padding = 0
        self._in_member = False
        self._ended = False

    def feed(self, data: memoryview) -> None:
        """Consume the next bytes of the archive."""
        pos, end = 0, len(data)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                self.sink.data(data[pos : pos + take])
                self._remaining -= take
                pos += take
                if not self._remaining:
                    self._close_member()
            elif self._padding:
                take = min(self._padding, end - pos)
                self._padding -= take
                pos += take
            else:
                take = min(BLOCK - len(self._header), end - pos)
                self._header += data[pos : pos + take]
                pos += take
                if len(self._header) == BLOCK:
                    header, self._header = bytes(self._header), bytearray()
                    self._parse(header)

    def finish(self) -> None:
        """The archive ended: check that it ended cleanly.

        Raises:
            Permanent: a member or header was cut short.
        """
        if self._remaining or self._in_member or (self._header and any(self._header)):
            raise _malformed(f"archive {self.archive} ended in the middle of a member")

    def _close_member(self) -> None:
        self._in_member = False
        self.sink.member_end()

    def _parse(self, h: bytes) -> None:
        if h == bytes(BLOCK):
            self._ended = True  # end-of-archive marker; a second zero block may follow
            return
        if self._ended:
            raise _malformed(f"data after the end of archive {self.archive}")
        stored = _octal(h[148:156], "checksum")
        if stored != sum(h[:148]) + 8 * 32 + sum(h[156:]):
            raise _malformed(f"tar header checksum mismatch in archive {self.archive}")
        name = h[0:100].split(b"\0", 1)[0].decode()
        if h[257:262] == b"ustar" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0].decode() + "/" + name
        kind = h[156:157]
        size = _octal(h[124:136], "size")
        link = h[157:257].split(b"\0", 1)[0].decode()
        if kind in _REGULAR:
            type_ = "file"
        elif kind == _DIRECTORY:
            type_, size = "dir", 0
        elif kind == _SYMLINK:
            type_, size = "link", 0
        else:
            raise _malformed(f"unsupported tar member type {kind!r} for {name!r}")
        member = Member(
            path=_clean(self.prefix + _clean(name)),
            type=type_,
            size=size,
            mode=_octal(h[100:108], "mode") & 0o7777,
            mtime=_octal(h[136:148], "mtime"),
            link_target=link,
        )
        self.sink.member(member)
        self._in_member = True
        self._remaining = size
        self._padding = -size % BLOCK
        if not size:
            self._close_member()


def _positions(res: pq.abc.PGresult | None, what: str) -> tuple[int, int]:
    if res is None:
        raise _malformed(f"no {what} result")
    rows = result_rows(res)
    if pq.ExecStatus(res.status) != pq.ExecStatus.TUPLES_OK or len(rows) != 1:
        raise _malformed(f"unexpected {what} result")
    lsn, tli = rows[0][0], rows[0][1]
    if lsn is None or tli is None:
        raise _malformed(f"empty {what} result")
    return int(Lsn.parse(lsn)), int(tli)


async def _expect(conn: ReplicationConnection, status: pq.ExecStatus) -> pq.abc.PGresult | None:
    """The next result; a server error is raised after draining the rest (pitfall P3)."""
    res = await conn.next_result()
    if res is not None and pq.ExecStatus(res.status) not in (status, pq.ExecStatus.COMMAND_OK):
        error = result_error(res, "BASE_BACKUP")
        while await conn.next_result() is not None:
            pass
        raise error
    return res


async def run(conn: ReplicationConnection, sql: str, sink: Sink) -> BackupPositions:
    """Send BASE_BACKUP and feed every archive and the manifest to ``sink``.

    Args:
        conn: a replication connection with no command in progress.
        sql: the command (see `command`).
        sink: receives the start positions, members, data, manifest and progress.

    Returns:
        The start and end positions and the tablespaces.

    Raises:
        ServerError: the server refused or aborted the backup.
        Retryable: the connection broke.
        Permanent: the stream does not look like BASE_BACKUP's.
    """
    await conn.send(sql)
    pos = BackupPositions()
    pos.start_lsn, pos.start_tli = _positions(
        await _expect(conn, pq.ExecStatus.TUPLES_OK), "start position"
    )
    res = await _expect(conn, pq.ExecStatus.TUPLES_OK)
    for oid, location, size in result_rows(res) if res is not None else []:
        estimate = int(size or 0) * 1024
        pos.estimated += estimate
        if oid is not None:
            pos.tablespaces.append(Tablespace(int(oid), location or "", estimate))
    res = await _expect(conn, pq.ExecStatus.COPY_OUT)
    if res is None or pq.ExecStatus(res.status) != pq.ExecStatus.COPY_OUT:
        raise _malformed("no COPY_OUT after the tablespace list")
    sink.started(pos)
    tar: TarReader | None = None
    in_manifest = False
    received = 0
    try:
        while True:
            msg = conn.read_copy()
            if msg is None:
                await sink.pace()
                # Usually the server is ahead and the socket already holds more: read it
                # without the cost of a readiness wait (thousands per second otherwise).
                conn.consume_input()
                msg = conn.read_copy()
            if msg is None:
                await conn.wait_readable(None)
                continue
            kind, payload = msg
            if kind == "d":
                received += len(payload)
                if in_manifest:
                    sink.manifest(payload)
                elif tar is not None:
                    tar.feed(payload)
                else:
                    raise _malformed("data before the first archive")
                sink.progress(received)
            elif kind == "n":
                if tar is not None:
                    tar.finish()
                name = bytes(payload).split(b"\0", 1)[0].decode()
                prefix = _archive_prefix(name)
                if prefix:  # the tablespace's own directory is in no archive: record it
                    sink.member(Member(prefix.rstrip("/"), "dir", 0, 0o700, int(time.time())))
                tar = TarReader(sink, prefix, name)
            elif kind == "m":
                if tar is not None:
                    tar.finish()
                tar, in_manifest = None, True
            elif kind == "p":
                if len(payload) >= 8:
                    sink.progress(max(received, struct.unpack_from("!q", payload)[0]))
            else:
                raise _malformed(f"unknown message type {kind!r}")
    except StreamEnded:
        pass
    if tar is not None:
        tar.finish()
    if not in_manifest:
        raise _malformed("the stream ended without a backup manifest")
    pos.end_lsn, pos.end_tli = _positions(
        await _expect(conn, pq.ExecStatus.TUPLES_OK), "end position"
    )
    while (res := await conn.next_result()) is not None:
        if pq.ExecStatus(res.status) not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            error: ServerError = result_error(res, "BASE_BACKUP")
            while await conn.next_result() is not None:
                pass
            raise error
    return pos


def _archive_prefix(name: str) -> str:
    if name == "base.tar":
        return ""
    oid = name.removesuffix(".tar")
    if not name.endswith(".tar") or not oid.isdigit():
        raise _malformed(f"unexpected archive {name!r} (server-side compression is not used)")
    return f"pg_tblspc/{oid}/"
