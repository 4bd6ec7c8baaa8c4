"""Log sequence numbers, written the way PostgreSQL writes them (``16/B374D848``)."""

from __future__ import annotations

import re
from typing import ClassVar

_MAX = (1 << 64) - 1
# pg_lsn_in accepts one to eight hex digits on each side of the slash, in either case.
_LSN_RE = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_INT_TYPES = frozenset("bcdoxXn")


class Lsn(int):
    """A position in the write-ahead log: an unsigned 64-bit byte offset.

    ``Lsn`` is an ``int``, so arithmetic and comparisons work as on numbers (and return plain
    ``int``); ``str()`` gives PostgreSQL's ``X/Y`` text in upper case.

    Raises:
        ValueError: the value is outside ``0 .. 2**64 - 1``.
    """

    INVALID: ClassVar[Lsn]

    def __new__(cls, value: int = 0) -> Lsn:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"an LSN is built from an int, not {type(value).__name__}")
        if not 0 <= value <= _MAX:
            raise ValueError(f"LSN {value} is out of range (0 to 2^64-1)")
        return super().__new__(cls, value)

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse PostgreSQL's ``X/Y`` notation (hex, case-insensitive).

        Args:
            text: e.g. ``"16/B374D848"`` or ``"0/3000028"``.

        Returns:
            The LSN.

        Raises:
            ValueError: the text is not an LSN.
        """
        match = _LSN_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"invalid LSN {text!r}: expected two hex numbers of up to 8 digits "
                "separated by '/', as in '16/B374D848'"
            )
        return cls((int(match.group(1), 16) << 32) | int(match.group(2), 16))

    @property
    def is_valid(self) -> bool:
        """False for ``0/0`` (PostgreSQL's InvalidXLogRecPtr)."""
        return self != 0

    def __str__(self) -> str:
        return f"{self >> 32:X}/{self & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"

    def __format__(self, spec: str) -> str:
        # f"{lsn}" must give the X/Y text, not the decimal int.
        if spec and spec[-1] in _INT_TYPES:
            return super().__format__(spec)
        return format(str(self), spec)


Lsn.INVALID = Lsn(0)
