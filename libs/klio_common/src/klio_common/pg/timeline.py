"""Timeline history files (``NNNNNNNN.history``): where each ancestor timeline ended."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from klio_common.pg.lsn import Lsn
from klio_common.pg.walname import MAX_TIMELINE


class HistoryEntry(NamedTuple):
    """One line of a history file: timeline ``parent_tli`` ended at ``switch_lsn``.

    Attributes:
        parent_tli: the ancestor timeline.
        switch_lsn: the first position that is no longer on ``parent_tli``.
        reason: PostgreSQL's free text (e.g. ``no recovery target specified``).
    """

    parent_tli: int
    switch_lsn: Lsn
    reason: str


class TimelineHistory:
    """The ancestry of one timeline, as PostgreSQL records it in ``<tli>.history``.

    Entries run from the oldest ancestor to the direct parent. Timeline 1 (or any
    timeline without a history file) has no entries.

    Args:
        timeline: the timeline this history describes.
        entries: the ancestors, oldest first.

    Raises:
        ValueError: timelines do not increase, reach ``timeline``, or switch points go backwards.
    """

    __slots__ = ("_entries", "_timeline")

    def __init__(self, timeline: int, entries: Iterable[HistoryEntry] = ()) -> None:
        if not 1 <= timeline <= MAX_TIMELINE:
            raise ValueError(f"invalid timeline {timeline}: expected 1 to {MAX_TIMELINE}")
        items = tuple(HistoryEntry(e[0], Lsn(e[1]), e[2]) for e in entries)
        previous: HistoryEntry | None = None
        for entry in items:
            if entry.parent_tli < 1:
                raise ValueError(f"invalid timeline {entry.parent_tli} in history of {timeline}")
            if previous is not None and entry.parent_tli <= previous.parent_tli:
                raise ValueError(
                    f"invalid history of timeline {timeline}: "
                    f"timeline ids must increase ({previous.parent_tli} then {entry.parent_tli})"
                )
            if previous is not None and entry.switch_lsn < previous.switch_lsn:
                raise ValueError(
                    f"invalid history of timeline {timeline}: switch point {entry.switch_lsn} "
                    f"is before the previous one {previous.switch_lsn}"
                )
            if "\n" in entry.reason:
                raise ValueError(f"invalid history of timeline {timeline}: reason spans lines")
            previous = entry
        if previous is not None and previous.parent_tli >= timeline:
            raise ValueError(
                f"invalid history of timeline {timeline}: "
                f"ancestor {previous.parent_tli} is not older than the timeline itself"
            )
        self._timeline = timeline
        self._entries = items

    @classmethod
    def parse(cls, timeline: int, text: str) -> TimelineHistory:
        """Parse the contents of a history file.

        Each line is ``<parent tli>\\t<switch LSN>\\t<reason>``; blank lines and lines starting
        with ``#`` are ignored, as PostgreSQL does.

        Args:
            timeline: the timeline the file belongs to (from its name).
            text: the file contents.

        Returns:
            The history.

        Raises:
            ValueError: a line cannot be parsed or the history is inconsistent.
        """
        entries: list[HistoryEntry] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split(None, 2)
            try:
                if len(fields) < 2:
                    raise ValueError("expected a timeline and a switch point")
                if not fields[0].isascii() or not fields[0].isdigit():
                    raise ValueError(f"timeline {fields[0]!r} is not a decimal number")
                parent = int(fields[0], 10)
                switch = Lsn.parse(fields[1])
            except ValueError as exc:
                raise ValueError(
                    f"invalid line {number} in history of timeline {timeline}: {raw!r} ({exc})"
                ) from None
            entries.append(HistoryEntry(parent, switch, fields[2] if len(fields) > 2 else ""))
        return cls(timeline, entries)

    def format(self) -> str:
        """The file contents, byte for byte as PostgreSQL writes them.

        PostgreSQL copies the parent's file and adds a newline before appending its own line,
        so entries after the first are separated by a blank line.
        """
        return "\n".join(f"{e.parent_tli}\t{e.switch_lsn}\t{e.reason}\n" for e in self._entries)

    @property
    def timeline(self) -> int:
        """The timeline this history describes."""
        return self._timeline

    @property
    def entries(self) -> tuple[HistoryEntry, ...]:
        """The ancestors, oldest first."""
        return self._entries

    def ancestors(self) -> list[int]:
        """The ancestor timeline ids, oldest first (the timeline itself excluded)."""
        return [e.parent_tli for e in self._entries]

    def timelines(self) -> list[int]:
        """Every timeline on this history's path, oldest first, ending with ``timeline``."""
        return [*self.ancestors(), self._timeline]

    def _index(self, tli: int) -> int:
        path = self.timelines()
        if tli not in path:
            raise ValueError(f"timeline {tli} is not in the history of timeline {self._timeline}")
        return path.index(tli)

    def parent_of(self, tli: int) -> int | None:
        """The timeline ``tli`` branched from along this history.

        Args:
            tli: a timeline on this history's path.

        Returns:
            The parent timeline, or None for the oldest one.

        Raises:
            ValueError: ``tli`` is not on this history's path.
        """
        index = self._index(tli)
        return self._entries[index - 1].parent_tli if index else None

    def begin_lsn(self, tli: int) -> Lsn:
        """Where timeline ``tli`` starts along this history (``0/0`` for the oldest one).

        Raises:
            ValueError: ``tli`` is not on this history's path.
        """
        index = self._index(tli)
        return self._entries[index - 1].switch_lsn if index else Lsn.INVALID

    def switch_point(self, tli: int) -> Lsn | None:
        """Where this history left timeline ``tli``.

        Args:
            tli: a timeline on this history's path.

        Returns:
            The first position no longer on ``tli``, or None for ``timeline`` itself (not left).

        Raises:
            ValueError: ``tli`` is not on this history's path.
        """
        index = self._index(tli)
        return self._entries[index].switch_lsn if index < len(self._entries) else None

    def timeline_of_lsn(self, lsn: int) -> int:
        """The timeline that holds position ``lsn`` along this history.

        A switch point belongs to the new timeline, as in PostgreSQL's ``tliOfPointInHistory``.
        """
        for entry in self._entries:
            if lsn < entry.switch_lsn:
                return entry.parent_tli
        return self._timeline

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TimelineHistory):
            return NotImplemented
        return (self._timeline, self._entries) == (other._timeline, other._entries)

    def __hash__(self) -> int:
        return hash((self._timeline, self._entries))

    def __repr__(self) -> str:
        return f"TimelineHistory({self._timeline}, {list(self._entries)!r})"
