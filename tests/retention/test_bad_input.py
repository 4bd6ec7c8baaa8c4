"""Bad input: unparsable policies and ones keeping nothing are refused, naming cluster and text."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fixtures.paths import KlioConfigWriter
from tests.restore.helpers import klio, output_of
from tests.wal_receiver.helpers import VENV_BIN

pytestmark = pytest.mark.integration


def _config(klio_config: KlioConfigWriter, root: Path, **retention: str) -> Path:
    cluster = {"name": "orders", "conninfo": "host=/nonexistent", "retention": retention}
    return klio_config(tier1=root, extra={"clusters": [cluster]})


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ("KEEP 7 DAYS", "cannot parse retention policy 'KEEP 7 DAYS' of cluster 'orders'"),
        ("REDUNDANCY 0", "retention policy 'REDUNDANCY 0' of cluster 'orders' would keep zero"),
        (
            "RECOVERY WINDOW OF 0 DAYS",
            "policy 'RECOVERY WINDOW OF 0 DAYS' of cluster 'orders' would keep zero backups",
        ),
    ],
)
def test_refused_by_the_command_and_the_service(
    tier1_dir: Path, klio_config: KlioConfigWriter, policy: str, words: str
) -> None:
    config = _config(klio_config, tier1_dir, tier1=policy)
    done = klio(config, "retention", "plan", as_postgres=False)
    assert done.returncode == 2, output_of(done)
    assert words in done.stderr, output_of(done)
    assert "clusters[orders].retention.tier1" in done.stderr
    assert "HINT:" in done.stderr
    assert done.stdout == ""

    service = subprocess.run(
        [str(VENV_BIN / "klio-retention"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert service.returncode == 2, service.stdout + service.stderr
    assert words in service.stdout + service.stderr


def test_tier2_policy_without_a_bucket(tier1_dir: Path, klio_config: KlioConfigWriter) -> None:
    config = _config(klio_config, tier1_dir, tier2="REDUNDANCY 3")
    done = klio(config, "retention", "apply", as_postgres=False)
    assert done.returncode == 2, output_of(done)
    assert "a Tier-2 policy ('REDUNDANCY 3') but no tier2 is configured" in done.stderr


def test_no_policy_for_the_tier_asked(tier1_dir: Path, klio_config: KlioConfigWriter) -> None:
    config = _config(klio_config, tier1_dir, tier1="REDUNDANCY 2")
    done = klio(config, "retention", "plan", "--tier", "2", as_postgres=False)
    assert done.returncode == 1, output_of(done)
    assert "cluster 'orders' has no retention policy for tier 2" in done.stderr
    assert "HINT: set clusters[orders].retention.tier2" in done.stderr


def test_an_empty_tier1_plans_nothing(tier1_dir: Path, klio_config: KlioConfigWriter) -> None:
    config = _config(klio_config, tier1_dir, tier1="REDUNDANCY 2")
    done = klio(config, "retention", "plan", as_postgres=False)
    assert done.returncode == 0, output_of(done)
    assert "tier 1: REDUNDANCY 2 (minimum redundancy 1)" in done.stdout
    assert "frees 0 B" in done.stdout


def test_unknown_cluster(tier1_dir: Path, klio_config: KlioConfigWriter) -> None:
    config = _config(klio_config, tier1_dir, tier1="REDUNDANCY 2")
    done = klio(config, "--cluster", "nope", "retention", "plan", as_postgres=False)
    assert done.returncode == 1, output_of(done)
    assert "unknown cluster 'nope'" in done.stderr
