"""Klio settings: a YAML file overridden by ``KLIO_*`` variables, every problem reported at once."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from klio_common.errors import ConfigError, NotFound
from klio_common.runtime.configtree import SERVICE_PORTS, Loader, read_yaml

if TYPE_CHECKING:
    from klio_common.crypto import KeyRing

Problems = Iterator[tuple[str, str]]
"""(key, message) pairs from a group's own checks; key is relative to the group."""

MIN_CHUNK_SIZE = 8 * 1024  # one PostgreSQL page
MAX_CHUNK_SIZE = 16 * 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SLOT = re.compile(r"[a-z0-9_]{1,63}")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*(@)")


def mask_conninfo(conninfo: str) -> str:
    """Return ``conninfo`` with any password replaced by ``***`` (key=value and URI forms)."""
    masked = _CONNINFO_PASSWORD.sub(r"\1***", conninfo)
    return _URI_PASSWORD.sub(r"\1***\2", masked)


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to reach NATS (``nats:``)."""

    url: str = "nats://127.0.0.1:4222"
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    creds_file: Path | None = None
    connect_timeout: float = 5.0

    def _problems(self) -> Problems:
        if not self.url.startswith(("nats://", "tls://", "ws://", "wss://")):
            yield "url", f"expected a nats:// or tls:// URL, got {self.url!r}"
        if self.connect_timeout <= 0:
            yield "connect_timeout", "must be greater than 0"
        if (self.tls_cert is None) != (self.tls_key is None):
            yield "tls_cert", "tls_cert and tls_key must be given together"


class Tier1Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The Tier-1 volume (``tier1:``); modes are octal (``0640`` or ``"0o640"``)."""

    path: Path
    file_mode: int = 0o640
    dir_mode: int = 0o750

    def _problems(self) -> Problems:
        if not self.path.is_absolute():
            yield "path", f"must be an absolute path, got '{self.path}'"
        # Directories may carry setgid so files inherit the group the PostgreSQL user reads with.
        for key, mode, allowed in (
            ("file_mode", self.file_mode, 0o777),
            ("dir_mode", self.dir_mode, 0o2777),
        ):
            if mode < 0 or mode & ~allowed:
                yield key, f"expected permission bits such as 0640, got {mode:#o}"


class S3Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The Tier-2 bucket (``tier2.s3:``); credentials come from the AWS chain, never from here."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    verify_tls: bool = True
    ca_bundle: Path | None = None

    def _problems(self) -> Problems:
        if not self.bucket:
            yield "bucket", "must not be empty"
        if self.endpoint_url is not None and not self.endpoint_url.startswith(
            ("http://", "https://")
        ):
            yield "endpoint_url", f"expected an http:// or https:// URL, got {self.endpoint_url!r}"
        if self.prefix.startswith("/"):
            yield "prefix", "must not start with '/'"


class Tier2Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tier 2 (``tier2:``)."""

    s3: S3Settings


class EncryptionSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Encryption keys (``encryption:``): files of 32 bytes by key id; ``active`` writes."""

    active: str | None = None
    keys: dict[str, Path] = {}

    def _problems(self) -> Problems:
        if self.active is not None and self.active not in self.keys:
            known = ", ".join(sorted(self.keys)) or "none"
            yield "active", f"key '{self.active}' is not in encryption.keys (configured: {known})"

    def keyring(self) -> KeyRing:
        """Load the key files.

        Returns:
            A ``klio_common.crypto.KeyRing`` with every configured key.

        Raises:
            EncryptionKeyError: a key file is missing, unreadable or not 32 bytes.
        """
        from klio_common.crypto import KeyRing

        return KeyRing.load(self.active, dict(self.keys))


class CompressionSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Compression of stored objects (``compression:``)."""

    algorithm: Literal["zstd", "none"] = "zstd"
    level: int = 3
    wal_level: int | None = 1  # WAL segments; None: ``level``
    backup_level: int | None = 1  # backup chunks; None: ``level``

    @property
    def wal(self) -> int:
        """The zstd level for WAL segments and history files."""
        return self.level if self.wal_level is None else self.wal_level

    @property
    def backup(self) -> int:
        """The zstd level for base-backup chunks and manifests."""
        return self.level if self.backup_level is None else self.backup_level

    def _problems(self) -> Problems:
        for key, value in (
            ("level", self.level),
            ("wal_level", self.wal_level),
            ("backup_level", self.backup_level),
        ):
            if value is not None and not 1 <= value <= 22:
                yield key, f"expected 1 to 22, got {value}"


class BackupSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How base backups are taken (``backup:``), for every cluster."""

    chunk_size: int = 524288
    checkpoint: Literal["fast", "spread"] = "fast"
    wal_timeout: float = 300.0
    jobs: int = 2

    def _problems(self) -> Problems:
        size = self.chunk_size
        if size & (size - 1) or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
            yield "chunk_size", f"expected a power of two from 8192 to 16777216, got {size}"
        if self.wal_timeout <= 0:
            yield "wal_timeout", "must be greater than 0"
        if not 1 <= self.jobs <= 64:
            yield "jobs", f"expected 1 to 64, got {self.jobs}"


class RelaySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the relay copies Tier 1 to the bucket (``relay:``)."""

    concurrency: int = 4
    reconcile_interval: float = 60.0
    multipart_threshold: int = 64 * 1024 * 1024

    def _problems(self) -> Problems:
        if not 1 <= self.concurrency <= 64:
            yield "concurrency", f"expected 1 to 64, got {self.concurrency}"
        if self.reconcile_interval <= 0:
            yield "reconcile_interval", "must be greater than 0"
        if not 5 * 1024 * 1024 <= self.multipart_threshold <= 5 * 1024**3:
            yield (
                "multipart_threshold",
                f"expected 5242880 (5 MiB) to 5368709120 (5 GiB), got {self.multipart_threshold}",
            )


class RetentionSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Retention policies per tier, kept as text for the retention service to parse."""

    tier1: str | None = None
    tier2: str | None = None


class RetentionServiceSettings(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """How the retention service runs (``retention:``), for every cluster."""

    minimum_redundancy: int = 1
    interval: float = 3600.0
    chunk_grace: float = 300.0

    def _problems(self) -> Problems:
        if self.minimum_redundancy < 1:
            yield (
                "minimum_redundancy",
                f"expected 1 or more (retention never deletes every backup), "
                f"got {self.minimum_redundancy}",
            )
        if self.interval <= 0:
            yield "interval", "must be greater than 0"
        if self.chunk_grace < 0:
            yield "chunk_grace", "must be 0 or more"


class ClusterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One protected PostgreSQL cluster (an item of ``clusters:``).

    ``application_name`` None means the slot name; `Settings.load` fills it in.
    """

    name: str
    conninfo: str
    password_file: Path | None = None
    slot: str = "klio"
    synchronous: bool = False
    application_name: str | None = None
    status_interval: float = 10.0
    backup_schedule: str | None = None
    retention: RetentionSettings = msgspec.field(default_factory=RetentionSettings)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={mask_conninfo(value) if name == 'conninfo' else value!r}"
            for name, value in msgspec.structs.asdict(self).items()
        )
        return f"ClusterSettings({fields})"

    def _problems(self) -> Problems:
        if not _DNS_LABEL.fullmatch(self.name):
            yield "name", f"expected a DNS-1123 label (a-z, 0-9, '-'), got {self.name!r}"
        if not self.conninfo.strip():
            yield "conninfo", "must not be empty"
        if not _SLOT.fullmatch(self.slot):
            yield "slot", f"expected 1 to 63 characters from a-z, 0-9 and '_', got {self.slot!r}"
        if self.status_interval <= 0:
            yield "status_interval", "must be greater than 0"
        schedule = self.backup_schedule
        if schedule is not None and not schedule.startswith("@") and len(schedule.split()) != 5:
            yield "backup_schedule", f"expected a cron expression of 5 fields, got {schedule!r}"

    def password(self) -> str | None:
        """Return the password read from ``password_file`` (trailing newline removed), or None."""
        if self.password_file is None:
            return None
        return self.password_file.read_text().rstrip("\r\n")


class ServiceSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One service's HTTP endpoint (``/livez``, ``/readyz``, ``/metrics``) and log level."""

    http_port: int
    http_host: str = "0.0.0.0"
    log_level: str = "info"

    def _problems(self) -> Problems:
        if not 0 <= self.http_port <= 65535:
            yield "http_port", f"expected 0 to 65535, got {self.http_port}"
        if self.log_level not in LOG_LEVELS:
            yield "log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"


def _default_services() -> dict[str, ServiceSettings]:
    return {name: ServiceSettings(http_port=port) for name, port in SERVICE_PORTS.items()}


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration. Build it with `Settings.load`."""

    nats: NatsSettings = msgspec.field(default_factory=NatsSettings)
    tier1: Tier1Settings | None = None
    tier2: Tier2Settings | None = None
    encryption: EncryptionSettings | None = None
    compression: CompressionSettings = msgspec.field(default_factory=CompressionSettings)
    relay: RelaySettings = msgspec.field(default_factory=RelaySettings)
    backup: BackupSettings = msgspec.field(default_factory=BackupSettings)
    retention: RetentionServiceSettings = msgspec.field(default_factory=RetentionServiceSettings)
    clusters: list[ClusterSettings] = []
    services: dict[str, ServiceSettings] = msgspec.field(default_factory=_default_services)

    @classmethod
    def load(cls, path: Path | None, env: Mapping[str, str]) -> Settings:
        """Read the YAML file, apply ``KLIO_*`` overrides and check everything.

        Args:
            path: the YAML file; None means ``env["KLIO_CONFIG"]`` when set, else no file.
            env: the environment (``os.environ`` in production). Variables ``KLIO_A__B__C``
                set key ``a.b.c`` (list items by index: ``KLIO_CLUSTERS__0__SLOT``); values
                are YAML scalars. Variables without ``__`` are not settings and are ignored.

        Returns:
            The settings.

        Raises:
            ConfigError: listing every problem, each with its dotted key.
        """
        if path is None and env.get("KLIO_CONFIG"):
            path = Path(env["KLIO_CONFIG"])
        problems: list[str] = []
        tree: Any = {}
        if path is not None:
            tree = read_yaml(path, problems)
        unreadable = bool(problems)
        loader = Loader(problems)
        loader.apply_env(tree, env)
        settings = None
        if not unreadable:
            loader.merge_services(tree)
            built = loader.build(cls, tree, "")
            if isinstance(built, Settings):
                settings = built._resolved(loader)
        if problems or settings is None:
            where = f" in {path}" if path is not None else ""
            raise ConfigError(
                problems, hint=f"fix the keys named above{where} or in the KLIO_* variables"
            )
        return settings

    def _resolved(self, loader: Loader) -> Settings:
        seen: set[str] = set()
        clusters = []
        for index, cluster in enumerate(self.clusters):
            if cluster.name in seen:
                loader.problem(f"clusters.{index}.name", f"duplicate cluster name '{cluster.name}'")
            seen.add(cluster.name)
            if cluster.application_name is None:
                cluster = msgspec.structs.replace(cluster, application_name=cluster.slot)
            clusters.append(cluster)
        services = _default_services()
        services.update(self.services)
        return msgspec.structs.replace(self, clusters=clusters, services=services)

    @property
    def warnings(self) -> list[str]:
        """Conditions every service warns about at start (e.g. encryption not configured)."""
        found = []
        if self.encryption is None or not self.encryption.keys:
            found.append(
                "encryption is not configured: WAL and backups are stored unencrypted"
                " (set encryption.active and encryption.keys)"
            )
        elif self.encryption.active is None:
            found.append(
                "no active encryption key: new WAL and backups are stored unencrypted"
                " (set encryption.active)"
            )
        return found

    def cluster(self, name: str) -> ClusterSettings:
        """Return the cluster named ``name``.

        Raises:
            NotFound: no such cluster; the hint lists the configured names.
        """
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        known = ", ".join(c.name for c in self.clusters) or "none"
        raise NotFound(f"unknown cluster '{name}'", hint=f"configured clusters: {known}")

    def service(self, name: str) -> ServiceSettings:
        """Return the settings of service ``name`` (``wal-receiver``, ``relay``, ...).

        Raises:
            NotFound: not a Klio service.
        """
        try:
            return self.services[name]
        except KeyError:
            known = ", ".join(sorted(self.services))
            raise NotFound(f"unknown service '{name}'", hint=f"services: {known}") from None
