"""Tests for klio_common.partial: open objects appended frame by frame, and read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from klio_common import fsio
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject
from klio_common.objects import decode_object, write_object
from klio_common.partial import PartialWriter, read_partial
from tests.unit.test_objects import (
    DATA,
    NONE,
    SEG,
    ZSTD,
    corrupt_message,
    encode,
    fix_crc,
    frames,
    ring,
    stat_mode,
)


def test_partial_write_and_read(tmp_path: Path, k1: KeyRing) -> None:
    path = tmp_path / "wal" / "open" / "000000010000000000000003.partial"
    writer = PartialWriter.create(
        path, kind="partial", name=path.name, codec=ZSTD, keyring=k1, file_mode=0o600
    )
    writer.append(0, DATA[:100])
    writer.append(100, DATA[100:5000])
    assert not path.exists()  # published by the first sync
    writer.sync()
    assert path.exists() and stat_mode(path) == 0o600
    writer.append(5000, DATA[5000:9000])
    writer.close()
    writer.close()
    header, plain, valid_end = read_partial(path, k1, source=SEG)
    assert (header.kind, header.plaintext_size, header.key_id) == ("partial", None, "k1")
    assert bytes(plain) == DATA[:9000] and valid_end == 9000
    assert fsio.remove_stale_temps(path.parent) == []
    with pytest.raises(CorruptObject, match="an open partial: use read_partial"):
        decode_object(path.read_bytes(), k1, source=SEG)


def test_a_partial_read_racing_an_append_is_read_again(
    tmp_path: Path, k1: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.partial"
    writer = PartialWriter.create(path, kind="partial", name="p", codec=ZSTD, keyring=k1)
    writer.append(0, DATA[:100])
    writer.sync()
    second = path.stat().st_size  # where the next frame's header goes
    writer.append(100, DATA[100:5000])
    writer.close()
    whole = path.read_bytes()
    # The reader saw the second frame's body but not yet its header (length and flags zero).
    torn = whole[:second] + bytes(5) + whole[second + 5 :]
    reads = [torn, whole]
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.pop(0))
    _, plain, valid_end = read_partial(path, k1, source="p")
    assert bytes(plain) == DATA[:5000] and valid_end == 5000
    # Damage at rest reads the same twice: reported.
    reads[:] = [torn, torn]
    with pytest.raises(CorruptObject, match="frame 1 is empty"):
        read_partial(path, k1, source="p")


def test_partial_gaps_and_late_start(tmp_path: Path) -> None:
    path = tmp_path / "p.partial"
    with PartialWriter.create(
        path, kind="partial", name="p", codec=NONE, keyring=KeyRing.none()
    ) as w:
        w.append(8192, b"a" * 100)
        w.append(8292, b"b" * 50)
        w.append(9000, b"c" * 10)
    _, plain, valid_end = read_partial(path, KeyRing.none(), source="p")
    assert len(plain) == 9010 and valid_end == 8342
    assert plain[:8192] == bytes(8192) and plain[8192:8342] == b"a" * 100 + b"b" * 50
    assert plain[8342:9000] == bytes(658) and plain[9000:] == b"c" * 10


def test_partial_large_append_is_split_into_frames(tmp_path: Path, k1: KeyRing) -> None:
    path = tmp_path / "p.partial"
    with PartialWriter.create(
        path, kind="partial", name="p", codec=ZSTD, keyring=k1, frame_size=1000
    ) as w:
        w.append(0, DATA)
    assert len(frames(path.read_bytes())[1]) == -(-len(DATA) // 1000)
    assert bytes(read_partial(path, k1, source="p")[1]) == DATA


def written_partial(tmp_path: Path, keyring: KeyRing) -> Path:
    path = tmp_path / "p.partial"
    with PartialWriter.create(path, kind="partial", name="p", codec=ZSTD, keyring=keyring) as w:
        for offset in range(0, 4000, 1000):
            w.append(offset, DATA[offset : offset + 1000])
    return path


@pytest.mark.parametrize("encrypted", [False, True])
def test_torn_last_frame_is_dropped(tmp_path: Path, encrypted: bool) -> None:
    keyring = ring(tmp_path) if encrypted else KeyRing.none()
    path = written_partial(tmp_path, keyring)
    whole = path.read_bytes()
    _, spans = frames(whole)
    for cut in (spans[3][0] + 3, spans[3][0] + 30, spans[3][1] - 1):
        path.write_bytes(whole[:cut])
        _, plain, valid_end = read_partial(path, keyring, source="p")
        assert valid_end == 3000 and bytes(plain) == DATA[:3000]
    path.write_bytes(whole + bytes(4096))  # unsynced tail the file system zero-filled
    assert read_partial(path, keyring, source="p")[2] == 4000


def test_unauthenticated_last_frame_is_dropped(tmp_path: Path, k1: KeyRing) -> None:
    path = written_partial(tmp_path, k1)
    obj = bytearray(path.read_bytes())
    start, end = frames(bytes(obj))[1][-1]
    obj[end - 1] ^= 1
    fix_crc(obj, start, end)
    path.write_bytes(obj)
    assert read_partial(path, k1, source="p")[2] == 3000


def test_damage_before_the_last_frame_raises(tmp_path: Path, k1: KeyRing) -> None:
    path = written_partial(tmp_path, k1)
    obj = bytearray(path.read_bytes())
    start, end = frames(bytes(obj))[1][1]
    obj[start + 12] ^= 1  # a frame field: its CRC fails
    path.write_bytes(obj)
    with pytest.raises(CorruptObject) as err:
        read_partial(path, k1, source=SEG)
    assert corrupt_message(err) == f"{SEG} is corrupt: frame 1 failed its checksum"
    obj[start + 12] ^= 1
    obj[end - 1] ^= 1  # the payload: only the AEAD tag notices
    path.write_bytes(obj)
    with pytest.raises(CorruptObject, match="frame 1 failed authentication"):
        read_partial(path, k1, source=SEG)


def test_read_partial_of_a_complete_object(tmp_path: Path, k1: KeyRing) -> None:
    path = tmp_path / "seg.partial"
    write_object(path, encode(DATA, k1))
    header, plain, valid_end = read_partial(path, k1, source=SEG)
    assert bytes(plain) == DATA and valid_end == len(DATA) and header.plaintext_size == len(DATA)


def test_recreating_a_partial_replaces_it_at_the_first_sync(tmp_path: Path, k1: KeyRing) -> None:
    path = written_partial(tmp_path, k1)
    old = path.read_bytes()
    header, plain, valid_end = read_partial(path, k1, source="p")
    writer = PartialWriter.create(path, kind="partial", name="p", codec=ZSTD, keyring=k1)
    writer.append(0, plain[:valid_end])
    writer.append(valid_end, b"more")
    assert path.read_bytes() == old  # until the new one is durable
    writer.sync()
    new_header, new_plain, new_end = read_partial(path, k1, source="p")
    assert new_header.wrapped_key != header.wrapped_key  # a new data key: nonces never repeat
    assert bytes(new_plain) == DATA[:4000] + b"more" and new_end == 4004
    writer.close()
    with pytest.raises(Exception, match="is closed; create a new one"):
        writer.append(0, b"x")


def test_abandoned_writer_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "p.partial"
    with (
        pytest.raises(RuntimeError),
        PartialWriter.create(
            path, kind="partial", name="p", codec=ZSTD, keyring=KeyRing.none()
        ) as w,
    ):
        w.append(0, b"data")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.partial"
    writer = PartialWriter.create(
        path, kind="partial", name="p", codec=NONE, keyring=KeyRing.none()
    )
    writer.append(0, b"a" * 100)
    writer.sync()
    real = os.pwrite

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        real(fd, memoryview(data)[:7], offset)  # a torn frame, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", pwrite)
    from klio_common.errors import Retryable

    with pytest.raises(Retryable, match=f"no space left on device writing {path}"):
        writer.append(100, b"b" * 100)
    monkeypatch.undo()
    with pytest.raises(Exception, match="failed earlier; create a new one"):
        writer.append(100, b"c")
    writer.close()
    assert frames(path.read_bytes())[1][-1][1] == path.stat().st_size  # torn bytes truncated
    assert read_partial(path, KeyRing.none(), source="p")[2] == 100


PARTIAL_WRITER = """
import sys
from pathlib import Path
from klio_common import compression
from klio_common import fsio
from klio_common.crypto import KeyRing
from klio_common.partial import PartialWriter
path, key = Path(sys.argv[1]), Path(sys.argv[2])
ring = KeyRing.load("k1", {"k1": key})
zstd = compression.get("zstd")
w = PartialWriter.create(path, kind="partial", name="p", codec=zstd, keyring=ring)
offset = 0
while offset < 1 << 30:
    w.append(offset, bytes([offset // 1000 % 251]) * 1000)
    offset += 1000
    if offset % 20000 == 0:
        w.sync()
        print(offset, flush=True)
"""


def test_partial_survives_being_killed(tmp_path: Path) -> None:
    key = tmp_path / "k1"
    key.write_bytes(os.urandom(32))
    keyring = KeyRing.load("k1", {"k1": key})
    path = tmp_path / "p.partial"
    args = [sys.executable, "-c", PARTIAL_WRITER, str(path), str(key)]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            synced = [int(child.stdout.readline()) for _ in range(20)]
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
    _, plain, valid_end = read_partial(path, keyring, source="p")
    assert valid_end >= synced[-1] and len(plain) == valid_end
    expected = b"".join(bytes([i % 251]) * 1000 for i in range(valid_end // 1000))
    assert bytes(plain) == expected
