"""Fetch one archived WAL or history file for PostgreSQL's ``restore_command`` (``%f %p``).

PostgreSQL runs ``restore_command`` once per file and reads only its exit status:

- 0: the file was restored to ``%p``;
- 1 (``EXIT_MISSING``): the file is not in the archive. PostgreSQL then tries ``pg_wal``, or treats
  it as the end of the archive and ends recovery (promoting, with ``recovery_target_action =
  promote``). This is the normal answer at the end of the archive and when PostgreSQL probes for
  history files of timelines that do not exist;
- 150 (``EXIT_FATAL``): the file may exist but cannot be delivered: corrupt object, wrong or
  missing key, unreadable configuration or archive. PostgreSQL stops recovery with FATAL for any
  status above 125 (it reads such statuses as "the command was killed"). That is deliberate: a
  non-fatal failure here would look like "not archived", and PostgreSQL would end recovery early and
  promote a database with committed transactions missing. A FATAL stop keeps the data directory as
  it is, so the operator can fix the key or the file and start it again.

The file is written to a temporary name in ``%p``'s directory and renamed, so PostgreSQL never sees
half a segment. There is no fsync: after a crash PostgreSQL fetches the file again.

Segments usually do not come through here: ``klio wal-restore`` first renames the segment from
the prefetch spool (``klio_restore.spool``) that ``klio_restore.prefetch`` fills ahead of replay.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.errors import KlioError, NotFound
from klio_common.pg.walname import is_history_name, is_partial_name, is_segment_name

if TYPE_CHECKING:
    from klio_restore.tier2 import BucketWal

EXIT_RESTORED = 0
EXIT_MISSING = 1
EXIT_FATAL = 150

Source = Callable[[str], bytes | None]
"""A place WAL is fetched from: the verified plaintext of a file by name, or None if absent."""


def is_wal_file_name(name: str) -> bool:
    """Whether ``name`` is a file ``restore_command`` may be asked for and Klio archives."""
    return is_segment_name(name) or is_partial_name(name) or is_history_name(name)


def tier1_source(archive: WalArchive, keyring: KeyRing) -> Source:
    """A source reading the Tier-1 archive; corruption and key errors propagate.

    Raises:
        NotFound: the archive itself does not exist (a wrong path or cluster, not a missing file).
    """
    if not archive.cluster_dir.is_dir():
        raise _no_archive(archive)

    def fetch(name: str) -> bytes | None:
        try:
            return archive.read(name, keyring)
        except NotFound:
            return None

    return fetch


def sources(
    archive: WalArchive | None,
    keyring: KeyRing,
    bucket: Callable[[], BucketWal] | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> list[Source]:
    """Where ``wal-restore`` looks: Tier 1, then Tier 2 (the bucket) when one is configured.

    The bucket serves a file Tier 1 lacks, and one whose Tier-1 copy fails its checks (or
    cannot be read). Each tier's errors still stop recovery: a corrupt bucket copy, or a bucket
    that cannot be reached, raises rather than reading as "not archived" (which would end
    recovery early). A Tier-1 copy that is unusable while the bucket lacks the file raises the
    Tier-1 error.

    Args:
        archive: the Tier-1 archive; None when no Tier 1 is configured.
        keyring: the keys.
        bucket: makes the Tier-2 reader on first use (so a Tier-1 hit never starts an S3
            client); None without Tier 2.
        log: told which tier served a file from the bucket, and why Tier 1 did not.

    Raises:
        NotFound: there is no Tier-2 fallback and the Tier-1 archive does not exist.
    """
    if bucket is None:
        if archive is None:
            raise NotFound(
                "no WAL archive is configured",
                hint="set tier1.path, or tier2.s3 to read the bucket",
            )
        return [tier1_source(archive, keyring)]
    first = None
    if archive is not None and archive.cluster_dir.is_dir():
        first = tier1_source(archive, keyring)
    return [_with_fallback(first, bucket, keyring, log or (lambda _m: None))]


def _with_fallback(
    first: Source | None,
    bucket: Callable[[], BucketWal],
    keyring: KeyRing,
    log: Callable[[str], None],
) -> Source:
    reader: list[BucketWal] = []

    def fetch(name: str) -> bytes | None:
        problem: Exception | None = None
        if first is not None:
            try:
                data = first(name)
            except (KlioError, OSError) as exc:
                problem = exc
                log(f"{name}: the Tier-1 copy is unusable: {_describe(exc)}; trying Tier 2")
            else:
                if data is not None:
                    return data
        if not reader:
            reader.append(bucket())
        try:
            data = reader[0].read(name, keyring)
        except NotFound:
            if problem is not None:
                raise problem from None
            return None
        log(f"{name} restored from Tier 2 ({reader[0].where})")
        return data

    return fetch


def _describe(exc: Exception) -> str:
    return exc.message if isinstance(exc, KlioError) else str(exc)


def fetch(name: str, dest: Path, chain: list[Source]) -> bool:
    """Restore WAL file ``name`` to ``dest`` from the first source that has it.

    Args:
        name: ``%f``: a segment, ``.partial`` or history file name.
        dest: ``%p``: where PostgreSQL wants the file (relative to its data directory).
        chain: the sources to try, in order.

    Returns:
        True when restored; False when no source has it (nothing is created).

    Raises:
        CorruptObject: the archived file fails its checks.
        EncryptionKeyError: it cannot be decrypted with the configured keys.
        OSError: ``dest`` cannot be written.
    """
    data = lookup(name, chain)
    if data is None:
        return False
    write_dest(dest, data)
    return True


def lookup(name: str, chain: list[Source]) -> bytes | None:
    """The verified plaintext of WAL file ``name`` from the first source that has it, or None.

    Raises:
        CorruptObject: the archived file fails its checks.
        EncryptionKeyError: it cannot be decrypted with the configured keys.
    """
    if not is_wal_file_name(name):
        return None
    for source in chain:
        data = source(name)
        if data is not None:
            return data
    return None


def write_dest(dest: Path, data: bytes) -> None:
    """Write ``dest`` (mode 0600) through a temporary file in its directory and a rename."""
    tmp = dest.with_name(f".{dest.name}.klio-{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _no_archive(archive: WalArchive) -> NotFound:
    return NotFound(
        f"no WAL archive for cluster '{archive.cluster}' at {archive.cluster_dir}",
        hint="check tier1.path and --cluster, and that this OS user can read the Tier-1 volume",
    )
