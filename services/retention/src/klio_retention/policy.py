"""Retention policies: ``RECOVERY WINDOW OF N DAYS|WEEKS|MONTHS`` and ``REDUNDANCY N``."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from klio_common.errors import ConfigError

Unit = Literal["days", "weeks", "months"]

_WINDOW = re.compile(r"RECOVERY\s+WINDOW\s+OF\s+(\d+)\s+(DAYS?|WEEKS?|MONTHS?)", re.IGNORECASE)
_REDUNDANCY = re.compile(r"REDUNDANCY\s+(\d+)", re.IGNORECASE)
_MAX = 100_000
_EXAMPLES = "'RECOVERY WINDOW OF 7 DAYS', 'RECOVERY WINDOW OF 4 WEEKS' or 'REDUNDANCY 3'"


@dataclass(frozen=True)
class Policy:
    """One tier's retention policy.

    Attributes:
        kind: ``window`` keeps what recovery to any point of the last N units needs;
            ``redundancy`` keeps the newest N backups.
        count: N (1 or more).
        unit: the window's unit (``days`` for redundancy, where it is unused).
        text: the policy as the user wrote it.
    """

    kind: Literal["window", "redundancy"]
    count: int
    unit: Unit = "days"
    text: str = ""

    def window_start(self, now: datetime) -> datetime | None:
        """The oldest point that must stay restorable, or None for a redundancy policy.

        Months are calendar months (the day is clamped: March 31 minus one month is the last
        day of February), as Barman counts them.
        """
        if self.kind != "window":
            return None
        if self.unit == "days":
            return now - timedelta(days=self.count)
        if self.unit == "weeks":
            return now - timedelta(weeks=self.count)
        return months_before(now, self.count)

    def describe(self) -> str:
        """The canonical spelling: ``RECOVERY WINDOW OF 7 DAYS``, ``REDUNDANCY 3``."""
        if self.kind == "redundancy":
            return f"REDUNDANCY {self.count}"
        return f"RECOVERY WINDOW OF {self.count} {self.unit.upper()}"


def months_before(when: datetime, months: int) -> datetime:
    """``when`` moved back by calendar months, the day clamped to the target month's length."""
    index = when.year * 12 + (when.month - 1) - months
    year, month = divmod(index, 12)
    day = min(when.day, calendar.monthrange(year, month + 1)[1])
    return when.replace(year=year, month=month + 1, day=day)


def parse_policy(text: str, *, cluster: str, tier: int) -> Policy:
    """Parse one tier's policy text.

    Args:
        text: e.g. ``RECOVERY WINDOW OF 7 DAYS`` or ``REDUNDANCY 3`` (any case and spacing).
        cluster: the cluster it belongs to (named in errors).
        tier: 1 or 2 (named in errors).

    Returns:
        The policy.

    Raises:
        ConfigError: the text is not a policy, or it would keep zero backups; the message
            names the cluster, the key and the text.
    """
    key = f"clusters[{cluster}].retention.tier{tier}"
    stripped = " ".join(text.split())
    window = _WINDOW.fullmatch(stripped)
    redundancy = _REDUNDANCY.fullmatch(stripped)
    if window is not None:
        count = int(window.group(1))
        word = window.group(2).lower()
        unit: Unit = "days" if word.startswith("day") else "weeks"
        if word.startswith("month"):
            unit = "months"
        kind: Literal["window", "redundancy"] = "window"
    elif redundancy is not None:
        count, unit, kind = int(redundancy.group(1)), "days", "redundancy"
    else:
        raise ConfigError(
            [f"{key}: cannot parse retention policy {text!r} of cluster '{cluster}'"],
            hint=f"write {_EXAMPLES}",
        )
    if count < 1:
        what = "a window of no time" if kind == "window" else "no backup"
        raise ConfigError(
            [
                f"{key}: retention policy {text!r} of cluster '{cluster}' would keep zero "
                f"backups ({what})"
            ],
            hint="a policy keeps at least one backup: use 1 or more",
        )
    if count > _MAX:
        raise ConfigError(
            [f"{key}: retention policy {text!r} of cluster '{cluster}': {count} is too large"],
            hint=f"use at most {_MAX}",
        )
    return Policy(kind=kind, count=count, unit=unit, text=stripped)
