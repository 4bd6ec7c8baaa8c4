"""Encryption keys and the AES-256-GCM envelope (per-object data keys wrapped by master keys)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from klio_common.errors import ConfigError, EncryptionKeyError

__all__ = ["AESGCM", "KEY_SIZE", "InvalidTag", "KeyRing", "data_cipher", "new_data_key"]

KEY_SIZE: Final = 32
"""Master keys and data keys are AES-256 keys."""

NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
WRAPPED_SIZE: Final = NONCE_SIZE + KEY_SIZE + TAG_SIZE

_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_WRAP_AAD: Final = b"klio-data-key:"


def new_data_key() -> bytes:
    """Return a fresh random 32-byte data key (one per object or per open partial)."""
    return os.urandom(KEY_SIZE)


def data_cipher(data_key: bytes) -> AESGCM:
    """Return the AES-256-GCM cipher for a data key."""
    return AESGCM(data_key)


@dataclass(frozen=True, eq=False)
class KeyRing:
    """The configured master keys: all usable for reading, ``active`` for writing.

    Build it with :meth:`load` or :meth:`none`. Key bytes never appear in ``repr``.
    """

    active: str | None
    _keys: Mapping[str, bytes] = field(repr=False)
    _ciphers: dict[str, AESGCM] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for key_id, key in self._keys.items():
            self._ciphers[key_id] = AESGCM(key)

    @classmethod
    def none(cls) -> KeyRing:
        """Return a key ring without keys: objects are written unencrypted."""
        return cls(None, {})

    @classmethod
    def load(cls, active: str | None, files: Mapping[str, Path]) -> KeyRing:
        """Read the key files named in ``encryption.keys``.

        Args:
            active: the id of the key new objects are encrypted with, or None
                (nothing new is encrypted; the keys still decrypt old objects).
            files: key id → path of a file holding exactly 32 bytes.

        Raises:
            ConfigError: listing every problem (bad id, missing or unreadable
                file, wrong size, active key not configured).
        """
        problems: list[str] = []
        keys: dict[str, bytes] = {}
        for key_id, path in files.items():
            where = f"encryption.keys.{key_id}"
            if not _KEY_ID.fullmatch(key_id):
                problems.append(
                    f"encryption.keys: key id '{key_id}' is invalid "
                    "(up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit)"
                )
                continue
            try:
                key = Path(path).read_bytes()
            except FileNotFoundError:
                problems.append(f"{where}: key file {path} does not exist")
                continue
            except OSError as exc:
                problems.append(f"{where}: cannot read key file {path}: {exc.strerror or exc}")
                continue
            if len(key) != KEY_SIZE:
                problems.append(
                    f"{where}: key file {path} has {len(key)} bytes, expected exactly {KEY_SIZE} "
                    "(create one with: head -c 32 /dev/urandom > FILE)"
                )
                continue
            keys[key_id] = key
        if active is not None and active not in files:
            known = ", ".join(sorted(files)) or "none"
            problems.append(
                f"encryption.active: key '{active}' is not in encryption.keys (configured: {known})"
            )
        if problems:
            raise ConfigError(problems)
        return cls(active, keys)

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of every configured key."""
        return frozenset(self._keys)

    def get(self, key_id: str) -> bytes:
        """Return the master key ``key_id``.

        Raises:
            EncryptionKeyError: the key is not configured.
        """
        try:
            return self._keys[key_id]
        except KeyError:
            raise _missing(key_id) from None

    def wrap(self, data_key: bytes, master_key_id: str) -> bytes:
        """Encrypt a data key with the master key ``master_key_id``.

        Returns:
            nonce (12 bytes) + ciphertext and tag (48 bytes); the AAD binds the key id.

        Raises:
            EncryptionKeyError: the key is not configured.
        """
        cipher = self._cipher(master_key_id)
        nonce = os.urandom(NONCE_SIZE)
        return nonce + cipher.encrypt(nonce, data_key, _WRAP_AAD + master_key_id.encode())

    def unwrap(self, master_key_id: str, wrapped: bytes, *, what: str = "the data key") -> bytes:
        """Decrypt a data key wrapped by :meth:`wrap`.

        Args:
            master_key_id: the key id recorded beside ``wrapped``.
            wrapped: the wrapped data key.
            what: names the object in error messages.

        Raises:
            EncryptionKeyError: the key is not configured, or it does not open
                ``wrapped`` (wrong key or corrupt header).
        """
        cipher = self._cipher(master_key_id)
        try:
            if len(wrapped) != WRAPPED_SIZE:
                raise InvalidTag
            key = cipher.decrypt(
                wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], _WRAP_AAD + master_key_id.encode()
            )
        except InvalidTag:
            raise EncryptionKeyError(
                f"cannot decrypt {what} with key '{master_key_id}': wrong key or corrupt header",
                hint="check that the key file for this id is the one that wrote the object",
            ) from None
        return key

    def _cipher(self, key_id: str) -> AESGCM:
        try:
            return self._ciphers[key_id]
        except KeyError:
            raise _missing(key_id) from None


def _missing(key_id: str) -> EncryptionKeyError:
    return EncryptionKeyError(
        f"encryption key '{key_id}' is not configured",
        hint="add the key file that wrote this object under encryption.keys",
    )
