"""Settings: YAML, KLIO_* overrides, every problem at once, defaults and helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from klio_common.errors import ConfigError, NotFound
from klio_common.runtime.settings import (
    ClusterSettings,
    Settings,
    mask_conninfo,
)

FULL = """
nats: {url: "nats://nats:4222", connect_timeout: 2}
tier1: {path: /var/lib/klio, file_mode: 0640, dir_mode: "0o2750"}
tier2:
  s3: {bucket: klio, prefix: prod/, endpoint_url: "http://127.0.0.1:9000", region: eu-west-1}
encryption: {active: k1, keys: {k1: /etc/klio/keys/k1, k0: /etc/klio/keys/k0}}
compression: {algorithm: zstd, level: 9}
clusters:
  - name: main
    conninfo: "host=pg-rw port=5432 user=klio password=s3cret sslmode=verify-full"
    slot: klio_main
    synchronous: true
    backup_schedule: "0 3 * * *"
    retention: {tier1: "RECOVERY WINDOW OF 7 DAYS", tier2: "REDUNDANCY 3"}
  - name: other
    conninfo: "host=other"
    application_name: standby1
services:
  relay: {http_port: 9999, log_level: debug}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "klio.yaml"
    path.write_text(text)
    return path


def problems(path: Path | None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        Settings.load(path, env or {})
    return caught.value.problems


def test_a_full_file_loads_into_typed_groups(tmp_path: Path) -> None:
    settings = Settings.load(write(tmp_path, FULL), {})
    assert settings.nats.url == "nats://nats:4222"
    assert settings.nats.connect_timeout == 2.0
    assert settings.tier1 is not None
    assert settings.tier1.path == Path("/var/lib/klio")
    assert (settings.tier1.file_mode, settings.tier1.dir_mode) == (0o640, 0o2750)
    assert settings.tier2 is not None
    assert settings.tier2.s3.bucket == "klio"
    assert settings.tier2.s3.region == "eu-west-1"
    assert settings.tier2.s3.verify_tls is True
    assert settings.encryption is not None
    assert settings.encryption.keys["k0"] == Path("/etc/klio/keys/k0")
    assert settings.compression.level == 9
    main = settings.cluster("main")
    assert main.slot == "klio_main"
    assert main.synchronous is True
    assert main.application_name == "klio_main"  # defaults to the slot name
    assert main.retention.tier2 == "REDUNDANCY 3"
    assert settings.cluster("other").application_name == "standby1"
    assert settings.cluster("other").status_interval == 10.0
    assert settings.service("relay").http_port == 9999
    assert settings.service("relay").log_level == "debug"
    assert settings.service("retention").http_port == 9474
    assert settings.warnings == []


def test_no_file_gives_the_defaults_and_warns_about_encryption() -> None:
    settings = Settings.load(None, {})
    assert settings.nats.url == "nats://127.0.0.1:4222"
    assert settings.tier1 is None and settings.tier2 is None and settings.encryption is None
    assert settings.compression.algorithm == "zstd" and settings.compression.level == 3
    assert settings.clusters == []
    ports = {name: s.http_port for name, s in settings.services.items()}
    assert ports == {"wal-receiver": 9471, "basebackup": 9472, "relay": 9473, "retention": 9474}
    assert settings.service("wal-receiver").http_host == "0.0.0.0"
    assert len(settings.warnings) == 1
    assert "encryption is not configured" in settings.warnings[0]


def test_keys_without_an_active_one_warn(tmp_path: Path) -> None:
    settings = Settings.load(write(tmp_path, "encryption: {keys: {k1: /k1}}"), {})
    assert settings.warnings == [
        "no active encryption key: new WAL and backups are stored unencrypted"
        " (set encryption.active)"
    ]


def test_klio_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "compression: {level: 7}")
    assert Settings.load(None, {"KLIO_CONFIG": str(path)}).compression.level == 7


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "KLIO_NATS__URL": "nats://elsewhere:4222",
        "KLIO_TIER1__PATH": "/data",
        "KLIO_COMPRESSION__LEVEL": "5",
        "KLIO_CLUSTERS__0__CONNINFO": "host=new",
        "KLIO_CLUSTERS__1__SLOT": "123",  # a string field takes the text as written
        "KLIO_CLUSTERS__1__SYNCHRONOUS": "false",
        "KLIO_CLUSTERS__2__NAME": "third",  # the next index appends an item
        "KLIO_CLUSTERS__2__CONNINFO": "host=third",
        "KLIO_SERVICES__WAL_RECEIVER__HTTP_PORT": "8000",
        "KLIO_ENCRYPTION__KEYS__K2": "/etc/klio/keys/k2",
        "KLIO_ENCRYPTION__ACTIVE": "k2",
        # not settings: no "__" (Kubernetes injects these for a Service named klio)
        "KLIO_SERVICE_HOST": "10.0.0.1",
        "KLIO_LOG_FORMAT": "text",
        "OTHER__THING": "x",
    }
    settings = Settings.load(write(tmp_path, FULL), env)
    assert settings.nats.url == "nats://elsewhere:4222"
    assert settings.tier1 is not None and settings.tier1.path == Path("/data")
    assert settings.tier1.file_mode == 0o640  # the rest of the group comes from the file
    assert settings.compression.level == 5
    assert settings.cluster("main").conninfo == "host=new"
    assert settings.cluster("main").slot == "klio_main"
    assert settings.cluster("other").slot == "123"
    assert settings.cluster("other").synchronous is False
    assert settings.cluster("third").conninfo == "host=third"
    assert settings.service("wal-receiver").http_port == 8000
    assert settings.encryption is not None and settings.encryption.active == "k2"
    assert set(settings.encryption.keys) == {"k0", "k1", "k2"}


def test_environment_alone_is_enough() -> None:
    env = {
        "KLIO_TIER2__S3__BUCKET": "b",
        "KLIO_TIER2__S3__VERIFY_TLS": "no",
        "KLIO_CLUSTERS__0__NAME": "main",
        "KLIO_CLUSTERS__0__CONNINFO": "host=x",
    }
    settings = Settings.load(None, env)
    assert settings.tier2 is not None and settings.tier2.s3.bucket == "b"
    assert settings.tier2.s3.verify_tls is False
    assert [c.name for c in settings.clusters] == ["main"]


def test_every_problem_is_reported_at_once_with_its_key(tmp_path: Path) -> None:
    text = """
nats: {url: "http://x", conect_timeout: 3}
tier1: {path: relative, file_mode: 750}
tier2: {s3: {prefix: x}}
encryption: {active: k2, keys: {k1: /k1}}
compression: {algorithm: lz4, level: 30}
clusters:
  - name: Main
    conninfo: ""
    slot: bad-slot
    status_interval: 0
    backup_schedule: "daily"
  - {name: ok, conninfo: "host=x", synchronous: maybe}
  - {name: ok, conninfo: "host=y"}
  - {name: nameless}
services: {relya: {}, relay: {http_port: 99999, log_level: loud}}
"""
    found = problems(write(tmp_path, text), {"KLIO_COMPRESSION__ALGORITHM": "none"})
    assert found == [
        "services.relya: unknown key (did you mean 'relay'?)",
        "nats.conect_timeout: unknown key (did you mean 'connect_timeout'?)",
        "nats.url: expected a nats:// or tls:// URL, got 'http://x'",
        "tier1.path: must be an absolute path, got 'relative'",
        "tier1.file_mode: expected permission bits such as 0640, got 0o1356",
        "tier2.s3.bucket: missing (required)",
        "encryption.active: key 'k2' is not in encryption.keys (configured: k1)",
        "compression.level: expected 1 to 22, got 30",
        "clusters.0.name: expected a DNS-1123 label (a-z, 0-9, '-'), got 'Main'",
        "clusters.0.conninfo: must not be empty",
        "clusters.0.slot: expected 1 to 63 characters from a-z, 0-9 and '_', got 'bad-slot'",
        "clusters.0.status_interval: must be greater than 0",
        "clusters.0.backup_schedule: expected a cron expression of 5 fields, got 'daily'",
        "clusters.1.synchronous: expected true or false, got str 'maybe'",
        "clusters.3.conninfo: missing (required)",
        "services.relay.http_port: expected 0 to 65535, got 99999",
        "services.relay.log_level: expected one of debug, info, warning, error, critical,"
        " got 'loud'",
    ]


def test_problems_from_the_environment_name_the_variable() -> None:
    env = {
        "KLIO_COMPRESSION__LEVEL": "high",
        "KLIO_COMPRESSION__ALGORITHM": "lz4",
        "KLIO_CLUSTERS__3__SLOT": "x",
        "KLIO_NATS____URL": "x",
        "KLIO_NATS__URL__HOST": "x",
    }
    found = problems(None, env)
    assert found == [
        "KLIO_CLUSTERS__3__SLOT: '3' is not an index of clusters (next index: 0)",
        "KLIO_NATS____URL: empty key between '__' separators",
        "nats.url (from KLIO_NATS__URL__HOST): expected a string, got dict {'host': 'x'}",
        "compression.algorithm (from KLIO_COMPRESSION__ALGORITHM): expected one of 'zstd',"
        " 'none', got str 'lz4'",
        "compression.level (from KLIO_COMPRESSION__LEVEL): expected an integer, got str 'high'",
    ]


def test_duplicate_cluster_names_are_refused(tmp_path: Path) -> None:
    text = "clusters: [{name: a, conninfo: x}, {name: a, conninfo: y}]"
    assert problems(write(tmp_path, text)) == ["clusters.1.name: duplicate cluster name 'a'"]


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    [problem] = problems(missing)
    assert problem.startswith(f"{missing}: cannot read the configuration file")
    [problem] = problems(write(tmp_path, "nats: {url: [unclosed"))
    assert "invalid YAML at line 1" in problem
    [problem] = problems(write(tmp_path, "- a list"))
    assert problem.endswith("expected a mapping at the top level, got list")
    [problem] = problems(write(tmp_path, "clusters: {name: main}"))
    assert problem == "clusters: expected a list, got dict {'name': 'main'}"


def test_the_error_message_lists_problems_and_hints(tmp_path: Path) -> None:
    path = write(tmp_path, "nats: {ur: x}")
    with pytest.raises(ConfigError) as caught:
        Settings.load(path, {})
    text = str(caught.value)
    assert text.startswith("invalid configuration (1 problem(s)):\n  - nats.ur: unknown key")
    assert f"HINT: fix the keys named above in {path} or in the KLIO_* variables" in text


def test_octal_modes_in_every_spelling(tmp_path: Path) -> None:
    for spelling in ("0640", '"0640"', '"0o640"', "416"):
        path = write(tmp_path, f"tier1: {{path: /t, file_mode: {spelling}}}")
        settings = Settings.load(path, {})
        assert settings.tier1 is not None and settings.tier1.file_mode == 0o640
    [problem] = problems(None, {"KLIO_TIER1__PATH": "/t", "KLIO_TIER1__FILE_MODE": "0o9"})
    assert problem == (
        "tier1.file_mode (from KLIO_TIER1__FILE_MODE): expected an octal mode such as 0640,"
        " got '0o9'"
    )


def test_cluster_and_service_lookups_name_the_choices(tmp_path: Path) -> None:
    settings = Settings.load(write(tmp_path, FULL), {})
    with pytest.raises(NotFound) as caught:
        settings.cluster("nope")
    assert caught.value.message == "unknown cluster 'nope'"
    assert caught.value.hint == "configured clusters: main, other"
    with pytest.raises(NotFound, match="unknown service 'web'"):
        settings.service("web")


def test_passwords_are_masked_in_repr(tmp_path: Path) -> None:
    settings = Settings.load(write(tmp_path, FULL), {})
    text = repr(settings)
    assert "s3cret" not in text
    assert "password=***" in text
    assert mask_conninfo("host=x password='a b\\'c' user=k") == "host=x password=*** user=k"
    assert mask_conninfo("postgresql://klio:pw@host/db") == "postgresql://klio:***@host/db"
    assert mask_conninfo("host=x") == "host=x"


def test_password_file_is_read_without_its_newline(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    cluster = ClusterSettings(name="main", conninfo="host=x", password_file=secret)
    assert cluster.password() == "hunter2"
    assert ClusterSettings(name="main", conninfo="host=x").password() is None


def test_keyring_loads_the_configured_keys(tmp_path: Path) -> None:
    key = tmp_path / "k1"
    key.write_bytes(bytes(range(32)))
    settings = Settings.load(
        None, {"KLIO_ENCRYPTION__ACTIVE": "k1", "KLIO_ENCRYPTION__KEYS__K1": str(key)}
    )
    assert settings.encryption is not None
    keyring = settings.encryption.keyring()
    assert keyring.get("k1") == bytes(range(32))


def test_backup_settings_have_defaults_and_are_checked(tmp_path: Path) -> None:
    backup = Settings.load(None, {}).backup
    assert (backup.chunk_size, backup.checkpoint, backup.wal_timeout, backup.jobs) == (
        524288,
        "fast",
        300.0,
        2,
    )
    path = write(tmp_path, "backup: {chunk_size: 1048576, checkpoint: spread, wal_timeout: 30}\n")
    loaded = Settings.load(path, {"KLIO_BACKUP__JOBS": "4"}).backup
    assert (loaded.chunk_size, loaded.checkpoint, loaded.wal_timeout, loaded.jobs) == (
        1 << 20,
        "spread",
        30.0,
        4,
    )
    bad = write(tmp_path, "backup: {chunk_size: 100000, checkpoint: slow, wal_timeout: 0}\n")
    found = problems(bad, {"KLIO_BACKUP__JOBS": "0"})
    assert any(p.startswith("backup.chunk_size:") and "power of two" in p for p in found), found
    assert any(p.startswith("backup.checkpoint:") for p in found), found
    assert any(p.startswith("backup.wal_timeout:") for p in found), found
    assert any(p.startswith("backup.jobs (from KLIO_BACKUP__JOBS):") for p in found), found
    for size in (4096, 32 << 20):
        assert problems(write(tmp_path, f"backup: {{chunk_size: {size}}}\n"))
