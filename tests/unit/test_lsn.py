"""Tests of klio_common.pg.lsn."""

from __future__ import annotations

import pytest

from klio_common.pg import Lsn


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/3000028", 0x3000028),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("16/b374d848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", (1 << 64) - 1),
        (" 1/0 ", 1 << 32),
    ],
)
def test_parse(text: str, value: int) -> None:
    assert Lsn.parse(text) == value


@pytest.mark.parametrize(
    "text", ["", "0", "16B374D848", "1/2/3", "G/0", "123456789/0", "0/123456789", "-1/0", "0x1/0"]
)
def test_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        Lsn.parse(text)


def test_parse_rejects_non_text() -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        Lsn.parse(12)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["0/0", "0/3000028", "16/B374D848", "FFFFFFFF/FFFFFFFF", "1/A"])
def test_str_round_trips_like_postgresql(text: str) -> None:
    assert str(Lsn.parse(text)) == text
    assert str(Lsn.parse(text.lower())) == text


def test_str_is_uppercase_without_padding() -> None:
    assert str(Lsn(0x1_0000_000A)) == "1/A"
    assert f"{Lsn(0x2B000000)}" == "0/2B000000"
    assert f"{Lsn(0x2B000000):>12}" == "  0/2B000000"
    assert f"{Lsn(255):x}" == "ff"
    assert repr(Lsn(0x10)) == "Lsn('0/10')"


def test_is_an_int() -> None:
    lsn = Lsn.parse("1/0")
    assert isinstance(lsn, int)
    assert lsn + 16 == (1 << 32) + 16
    assert Lsn(lsn + 16) > lsn
    assert sorted([Lsn.parse("10/0"), Lsn.parse("9/0"), Lsn.parse("A/0")]) == [
        Lsn.parse("9/0"),
        Lsn.parse("A/0"),
        Lsn.parse("10/0"),
    ]


def test_invalid() -> None:
    assert Lsn.INVALID == 0
    assert isinstance(Lsn.INVALID, Lsn)
    assert not Lsn.INVALID.is_valid
    assert Lsn(1).is_valid


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_range(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Lsn(value)


@pytest.mark.parametrize("value", [1.0, "1", True])
def test_only_ints(value: object) -> None:
    with pytest.raises(TypeError):
        Lsn(value)  # type: ignore[arg-type]
