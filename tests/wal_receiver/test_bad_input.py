"""Bad input gets a clear error naming the problem, and nothing is written or lost."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from klio_common.errors import IdentityMismatch, Permanent, UnsupportedServer
from klio_common.pg.server import check_server_version
from klio_dev.waiting import wait_until
from tests.wal_receiver.helpers import (
    KLIO,
    announced,
    archive_of,
    load,
    receiver_inprocess,
    wait_archived,
    wal_restore,
    wal_verify,
    write_config,
)


def _first_error(settings: Any) -> str:
    """Run one receiver session and return the error it reports in its status."""
    with receiver_inprocess(settings):
        archive = archive_of(settings)
        wait_until(
            lambda: (archive.read_status() or {}).get("last_error") is not None,
            60,
            "the receiver to report an error",
        )
        status = archive.read_status()
    assert status is not None
    return str(status["last_error"])


def test_server_older_than_15_is_refused() -> None:
    with pytest.raises(UnsupportedServer) as err:
        check_server_version(140009)
    assert "14.9" in str(err.value) and "HINT:" in str(err.value)
    assert check_server_version(150004)


def test_role_without_replication(
    pg: Any, nats_server: Any, tier1_dir: Path, workdir: Path
) -> None:
    pg.execute("CREATE ROLE norepl LOGIN PASSWORD 'secret'")
    with (pg.data_dir / "pg_hba.conf").open("a") as hba:
        hba.write("host replication norepl 127.0.0.1/32 scram-sha-256\n")
    pg.reload()
    pw = workdir / "pw"
    pw.write_text("secret")
    config = write_config(
        workdir / "k.yaml",
        pg=pg,
        nats_url=nats_server.url,
        tier1=tier1_dir,
        keys=None,
        conninfo=f"host=127.0.0.1 port={pg.port} user=norepl",
        password_file=pw,
    )
    error = _first_error(load(config))
    assert "REPLICATION" in error and "HINT:" in error
    assert not list(archive_of(load(config)).wal_dir.glob("*/0*"))


def test_wal_level_minimal(
    pg_factory: Any, nats_server: Any, tier1_dir: Path, workdir: Path
) -> None:
    pg = pg_factory("minimal", settings={"wal_level": "minimal", "max_wal_senders": 0})
    config = write_config(
        workdir / "k.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=None
    )
    error = _first_error(load(config))
    assert "wal_level" in error and "HINT:" in error


def test_second_cluster_with_other_system_id_is_refused(
    pg: Any, pg_factory: Any, nats_server: Any, tier1_dir: Path, workdir: Path
) -> None:
    config = write_config(
        workdir / "a.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=None
    )
    settings = load(config)
    with receiver_inprocess(settings):
        wait_until(lambda: archive_of(settings).read_identity() is not None, 60, "identity")
    before = sorted(p.name for p in archive_of(settings).wal_dir.rglob("*"))
    other = pg_factory("other")
    config_b = write_config(
        workdir / "b.yaml", pg=other, nats_url=nats_server.url, tier1=tier1_dir, keys=None
    )
    error = _first_error(load(config_b))
    assert "refused" in error and str(other.system_identifier()) in error
    identity = archive_of(settings).read_identity()
    assert identity is not None and identity.system_id == str(pg.system_identifier())
    after = sorted(
        p.name for p in archive_of(settings).wal_dir.rglob("*") if p.name != "status.json"
    )
    assert after == [n for n in before if n != "status.json"]
    assert isinstance(IdentityMismatch("x"), Permanent)


def test_wrong_key_and_flipped_byte_are_detected(
    pg: Any, nats_server: Any, tier1_dir: Path, keyring_files: dict[str, Path], workdir: Path
) -> None:
    config = write_config(
        workdir / "k.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=keyring_files
    )
    settings = load(config)
    with receiver_inprocess(settings):
        end = pg.current_lsn()
        pg.switch_wal()
        wait_archived(settings, end)
    archive = archive_of(settings)
    name = archive.list_segments()[-1].name
    # a configuration whose key k1 is another key: decrypting must fail, nothing written
    other = workdir / "other-k1"
    other.write_bytes(b"\x01" * 32)
    wrong = write_config(
        workdir / "wrong.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys={"k1": other}
    )
    out = workdir / "out"
    result = wal_restore(wrong, name, out)
    assert result.returncode == 150, result.stderr
    assert b"k1" in result.stderr and not out.exists()
    # a configuration without the key at all
    nokey = write_config(
        workdir / "nokey.yaml",
        pg=pg,
        nats_url=nats_server.url,
        tier1=tier1_dir,
        keys={"k2": keyring_files["k2"]},
    )
    result = wal_restore(nokey, name, out)
    assert result.returncode == 150 and b"k1" in result.stderr and not out.exists()
    # a missing segment: exit 1, nothing created (PostgreSQL's end of archive)
    result = wal_restore(config, "0000000100000099000000FF", out)
    assert result.returncode == 1 and not out.exists()
    # one flipped byte in the stored object
    path = archive.segment_path(name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    result = wal_restore(config, name, out)
    assert result.returncode == 150 and name.encode() in result.stderr and not out.exists()
    verify = wal_verify(config)
    assert verify.returncode != 0 and name in verify.stdout.decode() + verify.stderr.decode()


def test_malformed_configuration_lists_every_error(workdir: Path) -> None:
    bad = workdir / "bad.yaml"
    bad.write_text(
        "nats: {url: 42, bogus: 1}\n"
        "compression: {algorithm: lz4, level: 99}\n"
        "clusters:\n  - name: Main_1\n    slot: bad-slot\n"
    )
    result = subprocess.run(
        [str(KLIO), "--config", str(bad), "wal", "status"], capture_output=True, check=False
    )
    err = result.stderr.decode()
    assert result.returncode != 0
    for key in (
        "nats.bogus",
        "compression.algorithm",
        "compression.level",
        "clusters.0.name",
        "clusters.0.slot",
        "clusters.0.conninfo",
    ):
        assert key in err, (key, err)


def test_archives_while_nats_is_down_and_announces_after(
    pg: Any, nats_server: Any, tier1_dir: Path, keyring_files: dict[str, Path], workdir: Path
) -> None:
    config = write_config(
        workdir / "k.yaml", pg=pg, nats_url=nats_server.url, tier1=tier1_dir, keys=keyring_files
    )
    settings = load(config)
    nats_server.stop()
    with receiver_inprocess(settings):
        names = []
        for _ in range(3):
            end = pg.current_lsn()
            pg.execute("CREATE TABLE IF NOT EXISTS t (v int); INSERT INTO t VALUES (1)")
            pg.switch_wal()
            wait_archived(settings, end + 1)
        names = [s.name for s in archive_of(settings).list_segments()]
        assert len(names) >= 3  # archived with NATS down
        nats_server.start()
        wait_until(
            lambda: set(names) <= set(announced(nats_server.url, "klio.main.wal.segment.closed")),
            60,
            "every archived segment announced once NATS is back",
        )
