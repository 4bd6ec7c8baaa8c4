"""What is on Tier 2, recorded on Tier 1: an append-only journal of relayed paths under ``tier2/``.

One line per verified object, ``<relative path>\\t<sha256 of the stored bytes>\\t<size>\\n``
(sha256 ``-`` when unknown), appended and fsynced once per batch. The relay is its only writer;
retention and the read path may read it. A crash can leave a torn last line, which loading
ignores: the object it named is simply relayed again (an idempotent no-op in the bucket). When the
journal is lost it is rebuilt from a listing of the bucket (`Tier2State.rebuild`).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from klio_common import fsio
from klio_common.errors import Retryable

JOURNAL = "tier2/journal"
"""The journal, relative to the cluster's Tier-1 directory."""
TOMBSTONES = "tier2/deleted"
"""Objects retention deleted from the bucket (journal lines): no longer trusted as present."""
UNKNOWN_SHA256 = "-"

_SHA256 = re.compile(r"[0-9a-f]{64}|-")


@dataclass(frozen=True)
class Tier2Entry:
    """One object known to be in the bucket.

    Attributes:
        path: path relative to the cluster directory (the bucket key without the prefix).
        sha256: hex SHA-256 of the stored bytes, or ``-`` when the bucket did not say.
        size: stored bytes.
    """

    path: str
    sha256: str
    size: int

    def line(self) -> bytes:
        """The journal line of this entry."""
        if "\t" in self.path or "\n" in self.path:
            raise ValueError(f"path {self.path!r} cannot be journaled")
        return f"{self.path}\t{self.sha256}\t{self.size}\n".encode()


def _parse(line: bytes) -> Tier2Entry | None:
    try:
        path, sha256, size = line.decode().split("\t")
        entry = Tier2Entry(path, sha256, int(size))
    except ValueError:
        return None
    return entry if path and _SHA256.fullmatch(sha256) and entry.size >= 0 else None


class Tier2State:
    """The set of objects one cluster has on Tier 2.

    Args:
        cluster_dir: ``<tier1>/<cluster>``.
        file_mode: mode of the journal.
        dir_mode: mode of ``tier2/``.
    """

    def __init__(self, cluster_dir: Path, *, file_mode: int = 0o640, dir_mode: int = 0o750) -> None:
        self.path = Path(cluster_dir) / JOURNAL
        self.tombstones = Path(cluster_dir) / TOMBSTONES
        self._tomb_seen = 0  # bytes of the tombstone file already applied
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._entries: dict[str, Tier2Entry] = {}
        self._lock = threading.Lock()  # record() runs on worker threads
        self._torn_tail = False

    @property
    def exists(self) -> bool:
        """Whether a journal exists (False: never relayed, or lost and to be rebuilt)."""
        return self.path.exists()

    def load(self) -> int:
        """Read the journal into memory, replacing what was loaded before.

        Returns:
            How many objects it lists.
        """
        entries: dict[str, Tier2Entry] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        for line in data.split(b"\n"):
            entry = _parse(line)
            if entry is not None:  # an unparsable line is a torn append: relayed again
                entries[entry.path] = entry
        with self._lock:
            self._entries = entries
            self._tomb_seen = 0
            # The next append starts on a fresh line, so it cannot merge with a torn one.
            self._torn_tail = bool(data) and not data.endswith(b"\n")
        self._apply_tombstones()
        return len(self._entries)

    def _apply_tombstones(self) -> None:
        """Forget objects retention deleted from the bucket since we last looked.

        Retention appends each path it deletes from Tier 2 to ``tier2/deleted`` before deleting it;
        an object that comes back (a chunk shared by a new backup) must be uploaded again, not
        skipped on the strength of an old journal line.
        """
        try:
            size = self.tombstones.stat().st_size
        except FileNotFoundError:
            return
        if size <= self._tomb_seen:
            return
        with self.tombstones.open("rb") as f:
            f.seek(self._tomb_seen)
            data = f.read(size - self._tomb_seen)
        complete = data[: data.rfind(b"\n") + 1]
        with self._lock:
            for line in complete.split(b"\n"):
                entry = _parse(line)
                if entry is not None:
                    self._entries.pop(entry.path, None)
            self._tomb_seen += len(complete)

    def __contains__(self, path: object) -> bool:
        self._apply_tombstones()
        return path in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Tier2Entry]:
        return iter(list(self._entries.values()))

    def get(self, path: str) -> Tier2Entry | None:
        """The entry of ``path``, or None when it is not known to be on Tier 2."""
        self._apply_tombstones()
        return self._entries.get(path)

    def record(self, entries: Iterable[Tier2Entry]) -> None:
        """Append verified objects and fsync once (the batch is durable when this returns).

        Raises:
            Retryable: the volume is full or cannot be written.
        """
        batch = [e for e in entries]
        if not batch:
            return
        data = b"".join(e.line() for e in batch)
        with self._lock:
            try:
                self._append(b"\n" + data if self._torn_tail else data)
            except Retryable:
                self._torn_tail = True  # the write may have stopped mid-line (a full volume)
                raise
            self._torn_tail = False
            for entry in batch:
                self._entries[entry.path] = entry

    def rebuild(self, entries: Iterable[Tier2Entry]) -> int:
        """Replace the journal with ``entries`` (e.g. from a bucket listing), atomically.

        Returns:
            How many objects it now lists.
        """
        fresh = {e.path: e for e in entries}
        data = b"".join(e.line() for e in fresh.values())
        with self._lock:
            try:
                fsio.atomic_write(
                    self.path, data, file_mode=self._file_mode, dir_mode=self._dir_mode
                )
            except OSError as exc:
                raise Retryable(f"cannot write the Tier-2 journal {self.path}: {exc}") from exc
            self._entries = fresh
            self._torn_tail = False
        return len(fresh)

    def _append(self, data: bytes) -> None:
        created = not self.path.exists()
        try:
            if created:
                fsio.ensure_dir(self.path.parent, self._dir_mode)
            fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self._file_mode
            )
        except OSError as exc:
            raise Retryable(f"cannot open the Tier-2 journal {self.path}: {exc}") from exc
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            if (full := fsio.space_error(self.path, exc)) is not None:
                raise full from exc
            raise Retryable(f"cannot append to the Tier-2 journal {self.path}: {exc}") from exc
        finally:
            os.close(fd)
        if created:
            self.path.chmod(self._file_mode)
            fsio.fsync_dir(self.path.parent)
