"""Retention policy texts: parsing, refusals naming cluster and text, window arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from klio_common.errors import ConfigError
from klio_retention.policy import Policy, months_before, parse_policy

NOW = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "kind", "count", "unit"),
    [
        ("RECOVERY WINDOW OF 7 DAYS", "window", 7, "days"),
        ("recovery window of 1 day", "window", 1, "days"),
        ("  Recovery   Window Of 2 WEEKS ", "window", 2, "weeks"),
        ("RECOVERY WINDOW OF 1 MONTH", "window", 1, "months"),
        ("RECOVERY WINDOW OF 6 MONTHS", "window", 6, "months"),
        ("REDUNDANCY 3", "redundancy", 3, "days"),
        ("redundancy\t1", "redundancy", 1, "days"),
    ],
)
def test_parses_each_form(text: str, kind: str, count: int, unit: str) -> None:
    policy = parse_policy(text, cluster="main", tier=1)
    assert (policy.kind, policy.count, policy.unit) == (kind, count, unit)


def test_canonical_spelling() -> None:
    assert parse_policy("recovery window of 2 week", cluster="c", tier=2).describe() == (
        "RECOVERY WINDOW OF 2 WEEKS"
    )
    assert parse_policy("redundancy 4", cluster="c", tier=2).describe() == "REDUNDANCY 4"


@pytest.mark.parametrize(
    "text",
    [
        "RECOVERY WINDOW 7 DAYS",
        "KEEP 7 DAYS",
        "REDUNDANCY",
        "REDUNDANCY three",
        "RECOVERY WINDOW OF 7 YEARS",
        "RECOVERY WINDOW OF -1 DAYS",
        "REDUNDANCY 3 RECOVERY WINDOW OF 7 DAYS",
        "",
    ],
)
def test_unparsable_names_cluster_tier_and_text(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy(text, cluster="orders", tier=2)
    message = str(caught.value)
    assert "cluster 'orders'" in message
    assert "retention.tier2" in message
    assert repr(text) in message
    assert "HINT:" in message


@pytest.mark.parametrize("text", ["REDUNDANCY 0", "RECOVERY WINDOW OF 0 DAYS"])
def test_a_policy_keeping_zero_backups_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="would keep zero backups") as caught:
        parse_policy(text, cluster="main", tier=1)
    assert repr(text) in str(caught.value)


def test_window_start() -> None:
    assert Policy("window", 7, "days").window_start(NOW) == NOW - timedelta(days=7)
    assert Policy("window", 2, "weeks").window_start(NOW) == NOW - timedelta(days=14)
    assert Policy("window", 1, "months").window_start(NOW) == datetime(
        2026, 2, 28, 12, 0, tzinfo=UTC
    )
    assert Policy("redundancy", 3).window_start(NOW) is None


@pytest.mark.parametrize(
    ("when", "months", "expected"),
    [
        (datetime(2026, 3, 31), 1, datetime(2026, 2, 28)),
        (datetime(2024, 3, 31), 1, datetime(2024, 2, 29)),
        (datetime(2026, 1, 15), 1, datetime(2025, 12, 15)),
        (datetime(2026, 1, 15), 13, datetime(2024, 12, 15)),
        (datetime(2026, 5, 31), 3, datetime(2026, 2, 28)),
    ],
)
def test_calendar_months(when: datetime, months: int, expected: datetime) -> None:
    assert months_before(when, months) == expected
