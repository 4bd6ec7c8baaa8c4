"""The content-addressed chunk store shared by one cluster's base backups on Tier 1.

A chunk is a piece of a data file (at most ``chunk_size`` bytes, cut at fixed, page-aligned file
offsets so that a page written in place changes exactly one chunk). Its id is a keyed hash of the
plaintext (HMAC-SHA-256 with the cluster's dedup key, itself stored encrypted), so ids reveal
nothing about the content when encryption is on; without encryption it is the plain SHA-256.

The default size, 512 KiB (64 pages), is a balance measured on a 1.2 GB cluster: against 128 KiB
a backup took about a quarter less time and CPU (a quarter of the files to create, and a quarter
of the hand-offs between the stream and the worker threads, which contend for the GIL at every
chunk), restores open a quarter of the files, while a second backup after a 2% change (new rows
plus updates of a hot range) added 0.52x the changed pages' bytes instead of 0.46x: PostgreSQL's
changes cluster (appends at the end of a relation, updates that fill new pages), so a coarser
grid re-stores little more. Scattered single-page changes are the worst case: each costs one
compressed chunk.

Chunks are written without an fsync each (tens of thousands per backup); the backup calls `sync`
once before it commits its manifest. A chunk file that no committed manifest references is never
trusted — it may be the torn leftover of a crashed backup — so a backup rewrites it instead of
deduplicating against it. Only committed chunks (``known`` ids) are skipped.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from klio_common import fsio
from klio_common.compression import Codec
from klio_common.crypto import KeyRing
from klio_common.errors import CorruptObject, NotFound
from klio_common.objects import ObjectHeader, decode_object, encode_object

DEFAULT_CHUNK_SIZE = 512 * 1024  # 64 PostgreSQL pages (see the module docstring)


class ChunkStore:
    """Chunks of one cluster under ``<tier1>/<cluster>/chunks/``.

    Args:
        cluster_dir: ``<tier1>/<cluster>``.
        keyring: keys; the active key encrypts new chunks and the dedup key.
        codec: compression for new chunks.
        file_mode: mode of created files.
        dir_mode: mode of created directories.
        read_only: never create the dedup key (read path, disaster-recovery mode).
    """

    def __init__(
        self,
        cluster_dir: Path,
        keyring: KeyRing,
        codec: Codec,
        *,
        file_mode: int = 0o640,
        dir_mode: int = 0o750,
        read_only: bool = False,
    ) -> None:
        self.dir = Path(cluster_dir) / "chunks"
        self.keyring = keyring
        self.codec = codec
        self.file_mode = file_mode
        self.dir_mode = dir_mode
        self.read_only = read_only
        self._key: bytes | None = None
        self._key_loaded = False

    # -- ids ----------------------------------------------------------------------------------

    @property
    def dedup_key_path(self) -> Path:
        """The encrypted dedup key (present once encryption has been used)."""
        return self.dir / "dedup.key"

    def _dedup_key(self) -> bytes | None:
        if self._key_loaded:
            return self._key
        path = self.dedup_key_path
        if not path.exists() and self.keyring.active is not None and not self.read_only:
            data = encode_object(
                secrets.token_bytes(32),
                kind="dedup-key",
                name="dedup.key",
                codec=self.codec,
                keyring=self.keyring,
            )
            fsio.write_exclusive(
                path,
                data,
                file_mode=self.file_mode,
                dir_mode=self.dir_mode,
                same=lambda _p: True,  # another writer won the race: use its key
            )
        if path.exists():
            _, key = decode_object(path.read_bytes(), self.keyring, source=f"dedup key {path}")
            self._key = key
        self._key_loaded = True
        return self._key

    def chunk_id(self, data: bytes | memoryview) -> str:
        """The id of a chunk (see `identify`)."""
        return self.identify(data)[0]

    def identify(self, data: bytes | memoryview) -> tuple[str, str]:
        """The id of a chunk and the SHA-256 of its plaintext (hex), from one pass over it."""
        return identify(self._dedup_key(), data)

    def path(self, chunk_id: str) -> Path:
        """Where chunk ``chunk_id`` lives: one level of 256-way fan-out, so after the first few
        hundred chunks a new chunk never creates a directory (a million chunks is ~4,000 a dir)."""
        return self.dir / chunk_id[:2] / chunk_id

    # -- writes -------------------------------------------------------------------------------

    def put(self, chunk_id: str, data: bytes | memoryview, *, sha256: str | None = None) -> int:
        """Store a chunk (not fsynced: call `sync` before committing); return its stored size.

        ``sha256``: the plaintext's SHA-256 (hex) from `identify`, so it is not computed again.

        Written in place, without a temporary file and rename: a chunk file is trusted only
        once a committed manifest references it (the backup service rewrites any other, and
        the commit's `sync` makes it durable first), so a file torn by a crash is never read
        as good, and overwriting it is what the next backup does. Ids are content hashes, so
        the bytes of a complete file of the same id are the same.
        """
        blob = encode_object(
            data,
            kind="chunk",
            name=chunk_id,
            codec=self.codec,
            keyring=self.keyring,
            plaintext_sha256=sha256,
        )
        path = self.path(chunk_id)
        try:
            try:
                fd = self._open(path)
            except FileNotFoundError:
                self._make_dirs(path.parent)
                fd = self._open(path)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
        except OSError as exc:
            if (full := fsio.space_error(path, exc)) is not None:
                raise full from exc
            raise
        os.close(fd)
        return len(blob)

    def _make_dirs(self, directory: Path) -> None:
        # Not fsio.ensure_dir: its fsync per new directory cost one fsync per chunk (ids are
        # random, so nearly every chunk opens a new fan-out directory); `sync` covers them.
        missing = []
        probe = directory
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for new in reversed(missing):
            try:
                new.mkdir(self.dir_mode)
            except FileExistsError:
                continue  # another worker made it
            new.chmod(self.dir_mode | (new.stat().st_mode & stat.S_ISGID))

    def _open(self, path: Path) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.file_mode)
        if self.file_mode & _UMASK:  # the umask took bits we want
            os.fchmod(fd, self.file_mode)
        return fd

    def sync(self) -> None:
        """Make every chunk written so far durable, with the directories created for them.

        One syncfs of the volume instead of an fsync per chunk and per directory.
        """
        if not self.dir.is_dir():
            return
        fsio.syncfs(self.dir)

    # -- reads --------------------------------------------------------------------------------

    def get(self, chunk_id: str, *, source: str = "", sealed_is_enough: bool = False) -> bytes:
        """The verified plaintext of a chunk.

        ``sealed_is_enough``: see `decode_object` (a restore's bulk read). The id is checked
        either way: from the header's SHA-256, which the AEAD tag vouches for when sealed.

        Raises:
            NotFound: the chunk is missing.
            CorruptObject: it fails its checks, or its content does not match its id.
        """
        what = f"chunk {chunk_id}" + (f" of {source}" if source else "")
        try:
            blob = self.path(chunk_id).read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"{what} is missing from {self.dir}",
                hint="restore it from Tier 2 or take a new backup",
            ) from None
        header, data = decode_object(
            blob, self.keyring, source=what, sealed_is_enough=sealed_is_enough
        )
        if header.name != chunk_id or not holds(self._dedup_key(), chunk_id, data, header):
            raise CorruptObject(
                f"{what} does not hold the content its id names",
                hint="restore it from Tier 2 or take a new backup; do not use this chunk",
            )
        return data

    def exists(self, chunk_id: str) -> bool:
        """Whether a file for the chunk exists (committed or not)."""
        return self.path(chunk_id).exists()

    def iter_ids(self) -> Iterator[str]:
        """Every chunk id with a file in the store (for garbage collection)."""
        if not self.dir.is_dir():
            return
        for a in os.scandir(self.dir):
            if not a.is_dir() or len(a.name) != 2:
                continue
            for b in os.scandir(a.path):
                if b.is_file() and not fsio.is_temp_name(b.name):
                    yield b.name


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o777  # unknown: always fchmod


_UMASK = _umask()


def identify(key: bytes | None, data: bytes | memoryview) -> tuple[str, str]:
    """A chunk's id and the SHA-256 of its plaintext (hex), hashing the plaintext once.

    The id is the SHA-256 itself without a dedup key, else HMAC-SHA-256(dedup key, SHA-256):
    as one-way and as keyed as an HMAC of the plaintext (whoever lacks the key cannot tell
    which content an id names), and the object's header needs that SHA-256 anyway.
    """
    digest = hashlib.sha256(data).digest()
    if key is None:
        return digest.hex(), digest.hex()
    return hmac.new(key, digest, hashlib.sha256).hexdigest(), digest.hex()


def holds(key: bytes | None, chunk_id: str, data: bytes, header: ObjectHeader) -> bool:
    """Whether a decoded chunk is the content ``chunk_id`` names.

    ``header.plaintext_sha256`` has been checked against ``data`` by `decode_object`, so the
    current id costs one HMAC of 32 bytes. Chunks written before 2026-11-25 are named by
    HMAC-SHA-256(dedup key, plaintext): accepted too (one more pass over those only).
    """
    sha = header.plaintext_sha256 or ""
    if key is None:
        return sha == chunk_id
    try:
        digest = bytes.fromhex(sha)
    except ValueError:
        return False
    if hmac.new(key, digest, hashlib.sha256).hexdigest() == chunk_id:
        return True
    return hmac.new(key, data, hashlib.sha256).hexdigest() == chunk_id
