"""Klio errors: every failure a user can see, with an optional hint.

Messages follow pgBackRest's style: lowercase, no final period, and an optional
``HINT:`` line saying what the user can do. ``Retryable`` and ``Permanent`` tell the
runtime how to settle a JetStream message (nak with delay, or term + dead letter).
"""

from __future__ import annotations


class KlioError(Exception):
    """Base of every Klio error.

    Args:
        message: what went wrong, lowercase, no final period.
        hint: what the user can do about it, or None.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nHINT: {self.hint}"
        return self.message


class Retryable(KlioError):
    """A failure that may go away by itself (server down, timeout): try again later."""


class VolumeFull(Retryable):
    """A write to Tier 1 found no space left (or the quota used up); nothing was written."""


class Permanent(KlioError):
    """A failure that retrying cannot fix (bad input, corrupt data, wrong key)."""


class ConfigError(Permanent):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], *, hint: str | None = None) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}",
            hint=hint or "fix the keys named above in the YAML file or KLIO_* variables",
        )


class CorruptObject(Permanent):
    """A stored object failed its integrity check (checksum, AEAD tag, header)."""


class EncryptionKeyError(Permanent):
    """An encryption key is missing, unreadable or wrong."""


class ConflictError(Permanent):
    """An object exists under the same name with different content: never overwritten."""


class IdentityMismatch(Permanent):
    """WAL or a backup from another PostgreSQL cluster (system identifier) was refused."""


class NotFound(Permanent):
    """A requested object (segment, backup, cluster) does not exist."""


class UnsupportedServer(Permanent):
    """The PostgreSQL server is too old or misconfigured for Klio."""
