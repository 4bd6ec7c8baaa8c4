"""The streaming tar parser and the chunker, fed by hand (no servers)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from klio_basebackup.chunker import Chunker
from klio_basebackup.stream import Member, TarReader, command
from klio_common.catalog.chunks import ChunkStore
from klio_common.compression import get as get_codec
from klio_common.crypto import KeyRing
from klio_common.errors import Permanent


class Recorder:
    """A sink that keeps what it was given."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.content: dict[str, bytes] = {}
        self.ended: list[str] = []

    def member(self, member: Member) -> None:
        self.members.append(member)
        self.content[member.path] = b""

    def data(self, piece: memoryview) -> None:
        self.content[self.members[-1].path] += bytes(piece)

    def member_end(self) -> None:
        self.ended.append(self.members[-1].path)


def _tar(members: list[tuple[str, bytes | None, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LONG = "base/16384/" + "d" * 90 + "/" + "f" * 60  # needs the ustar prefix field


@pytest.mark.parametrize("piece", [1, 7, 512, 32768])
def test_tar_members_arrive_whole_however_the_stream_is_cut(piece: int) -> None:
    files = [
        ("backup_label", b"START WAL LOCATION: 0/2000028\n", 0o600),
        ("base", None, 0o700),
        ("base/1/1259", bytes(range(256)) * 40, 0o600),
        ("empty", b"", 0o600),
        (LONG, b"x" * 1000, 0o640),
    ]
    raw = _tar(files)
    sink = Recorder()
    reader = TarReader(sink, "pg_tblspc/16400/", "16400.tar")  # type: ignore[arg-type]
    view = memoryview(raw)
    for start in range(0, len(view), piece):
        reader.feed(view[start : start + piece])
    reader.finish()
    paths = [m.path for m in sink.members]
    assert paths == [f"pg_tblspc/16400/{name}" for name, _, _ in files]
    assert sink.ended == paths
    for (_, data, mode), member in zip(files, sink.members, strict=True):
        assert member.type == ("dir" if data is None else "file")
        assert member.mode == mode and member.mtime == 1_700_000_000
        assert sink.content[member.path] == (data or b"")
        assert member.size == len(data or b"")


def test_tar_damage_is_refused() -> None:
    raw = bytearray(_tar([("global/pg_control", b"c" * 8192, 0o600)]))
    bad = bytearray(raw)
    bad[10] ^= 1  # inside the name: the header checksum no longer matches
    with pytest.raises(Permanent, match="checksum mismatch"):
        TarReader(Recorder(), "", "base.tar").feed(memoryview(bytes(bad)))  # type: ignore[arg-type]
    reader = TarReader(Recorder(), "", "base.tar")  # type: ignore[arg-type]
    reader.feed(memoryview(bytes(raw[:2000])))
    with pytest.raises(Permanent, match="ended in the middle of a member"):
        reader.finish()
    evil = _tar([("../../etc/passwd", b"x", 0o600)])
    with pytest.raises(Permanent, match="unsafe member path"):
        TarReader(Recorder(), "", "base.tar").feed(memoryview(evil))  # type: ignore[arg-type]


def test_command_quotes_the_label_and_asks_for_sha256() -> None:
    sql = command("klio it's", "spread")
    assert "LABEL 'klio it''s'" in sql and "CHECKPOINT 'spread'" in sql
    assert "MANIFEST_CHECKSUMS 'CRC32C'" in sql and "TABLESPACE_MAP true" in sql


async def test_chunker_cuts_at_fixed_offsets_and_stores_each_chunk_once(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, KeyRing.none(), get_codec("zstd", 1))
    page = 8192
    body = (b"A" * page) * 3 + b"B" * page + (b"A" * page) * 2 + b"tail"
    known_id = store.chunk_id(b"B" * page)
    chunker = Chunker(store, known={known_id}, chunk_size=page, jobs=2)
    store.put(known_id, b"B" * page)
    try:
        chunker.member(Member("base/1/2", "file", len(body), 0o600, 1))
        view = memoryview(body)
        for start in range(0, len(body), 3000):
            chunker.data(view[start : start + 3000])
            await chunker.pace()
        chunker.member_end()
        chunker.add_file(Member("backup_manifest", "file", 2, 0o600, 1), b"{}")
        entries = await chunker.finish()
    finally:
        await chunker.close()
    a_id = store.chunk_id(b"A" * page)
    assert entries[0].chunks == [a_id, a_id, a_id, known_id, a_id, a_id, store.chunk_id(b"tail")]
    assert entries[0].sha256 == ""  # files are checked by PostgreSQL's CRC32C and per chunk
    assert [e.path for e in entries] == ["base/1/2", "backup_manifest"]
    figures = chunker.figures
    assert (figures.chunks_total, figures.chunks_new) == (4, 3)  # A, B (trusted), tail, {}
    assert figures.size == len(body) + 2
    assert b"".join(store.get(c) for c in entries[0].chunks) == body
