"""Tests for klio_common.compression."""

from __future__ import annotations

import os
import threading

import pytest
import zstandard

from klio_common import compression
from klio_common.errors import ConfigError, CorruptObject

DATA = b"klio wal " * 5000 + os.urandom(3000)


@pytest.mark.parametrize("name", ["zstd", "none"])
@pytest.mark.parametrize("data", [b"", b"x", DATA])
def test_round_trip(name: str, data: bytes) -> None:
    codec = compression.get(name)
    assert codec.name == name
    packed = codec.compress(data)
    assert codec.decompress(packed, len(data)) == data
    assert codec.decompress(memoryview(packed), len(data)) == data


def test_zstd_compresses_and_honours_level() -> None:
    text = b" ".join(str(i * i).encode() for i in range(30_000))
    fast, small = compression.get("zstd", 1), compression.get("zstd", 19)
    assert len(small.compress(text)) < len(fast.compress(text)) < len(text)


def test_get_caches_codecs_per_level() -> None:
    assert compression.get("zstd", 3) is compression.get("zstd")
    assert compression.get("zstd", 3) is not compression.get("zstd", 4)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        compression.get("lz4")
    assert err.value.problems == ["compression.algorithm: unknown codec 'lz4'"]
    assert err.value.hint == "valid names are: none, zstd"


@pytest.mark.parametrize("level", [0, 23, -1])
def test_level_out_of_range(level: int) -> None:
    with pytest.raises(ConfigError, match=r"compression\.level"):
        compression.get("zstd", level)


def test_declared_size_above_limit_is_refused_before_decompressing() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    assert len(bomb) < 10_000
    with pytest.raises(CorruptObject, match="declares 67108864 bytes, more than 1048576"):
        compression.get("zstd").decompress(bomb, 1 << 20)


def test_frame_without_declared_size_is_bounded() -> None:
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4 << 20))
    codec = compression.get("zstd")
    assert codec.decompress(unsized, 4 << 20) == bytes(4 << 20)
    with pytest.raises(CorruptObject, match="more than 1048576"):
        codec.decompress(unsized, 1 << 20)
    with pytest.raises(CorruptObject, match="truncated"):
        codec.decompress(unsized[:-3], 4 << 20)


@pytest.mark.parametrize(
    "bad",
    [b"not zstd at all", b"", compression.get("zstd").compress(DATA)[:-5]],
    ids=["garbage", "empty", "truncated"],
)
def test_invalid_zstd_data(bad: bytes) -> None:
    with pytest.raises(CorruptObject):
        compression.get("zstd").decompress(bad, len(DATA))


def test_extra_bytes_after_the_frame_are_refused() -> None:
    codec = compression.get("zstd")
    with pytest.raises(CorruptObject):
        codec.decompress(codec.compress(b"abc") + b"junk", 100)


def test_none_codec_enforces_max_size() -> None:
    with pytest.raises(CorruptObject, match="more than 3"):
        compression.get("none").decompress(b"abcd", 3)


def test_threads_get_their_own_contexts_and_correct_results() -> None:
    codec = compression.get("zstd", 5)
    contexts: list[object] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def work(seed: int) -> None:
        try:
            for i in range(30):
                data = bytes([seed]) * 20_000 + os.urandom(2_000) + i.to_bytes(4, "big")
                assert codec.decompress(codec.compress(data), len(data)) == data
            with lock:
                contexts.append(codec._cctx())  # type: ignore[attr-defined]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len({id(c) for c in contexts}) == 6
