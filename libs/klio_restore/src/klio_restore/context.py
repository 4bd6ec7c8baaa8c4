"""What the read path needs for one cluster: its settings, tiers, key ring and codec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.errors import ConfigError, NotFound
from klio_common.runtime.settings import ClusterSettings, Settings

if TYPE_CHECKING:
    from klio_restore.tier2 import Bucket, BucketWal


def load_settings(config: Path | None, env: Mapping[str, str]) -> Settings:
    """Load the configuration the way every Klio command does.

    Args:
        config: the ``--config`` file, or None for ``KLIO_CONFIG`` from ``env``.
        env: the process environment.

    Returns:
        The settings.

    Raises:
        ConfigError: the configuration is missing or invalid.
    """
    if config is None and not env.get("KLIO_CONFIG"):
        raise ConfigError(
            ["no configuration file: neither --config nor KLIO_CONFIG is set"],
            hint="pass --config /path/to/klio.yaml or set KLIO_CONFIG",
        )
    return Settings.load(config, env)


def pick_cluster(settings: Settings, name: str | None) -> ClusterSettings:
    """The cluster named ``name``, or the only configured cluster when ``name`` is None.

    Raises:
        NotFound: no such cluster.
        ConfigError: ``name`` is None and not exactly one cluster is configured.
    """
    if name is not None:
        return settings.cluster(name)
    if len(settings.clusters) == 1:
        return settings.clusters[0]
    if not settings.clusters:
        raise ConfigError(
            ["clusters: no cluster is configured"], hint="add a cluster under clusters:"
        )
    names = ", ".join(c.name for c in settings.clusters)
    raise NotFound(
        f"{len(settings.clusters)} clusters are configured and no --cluster was given",
        hint=f"pass --cluster NAME (one of: {names})",
    )


@dataclass(frozen=True)
class ClusterContext:
    """The read path's view of one cluster, on the tier it reads.

    Attributes:
        settings: the whole configuration.
        cluster: this cluster's settings.
        tier1: its Tier-1 WAL archive, or None when no Tier 1 is configured (disaster-recovery
            mode: only the bucket).
        tier: the tier backups are read from (1 or 2).
    """

    settings: Settings
    cluster: ClusterSettings
    tier1: WalArchive | None
    tier: int = 1

    @property
    def archive(self) -> WalArchive:
        """The Tier-1 WAL archive.

        Raises:
            ConfigError: no Tier 1 is configured.
        """
        if self.tier1 is None:
            raise ConfigError(
                ["tier1.path: not set; this command reads the Tier-1 directory"],
                hint="set tier1.path, or use --tier 2 where the command offers it",
            )
        return self.tier1

    @property
    def has_tier2(self) -> bool:
        """Whether a bucket is configured."""
        return self.settings.tier2 is not None

    @cached_property
    def bucket(self) -> Bucket:
        """The cluster's objects in the bucket (the client starts on the first request).

        Raises:
            ConfigError: no Tier 2 is configured.
        """
        from klio_restore.tier2 import Bucket

        if self.settings.tier2 is None:
            raise ConfigError(
                ["tier2.s3: not set; reading Tier 2 needs the bucket"],
                hint="set tier2.s3.bucket (and endpoint_url, region) to the bucket the relay fills",
            )
        return Bucket(self.settings.tier2.s3, self.cluster.name)

    def bucket_wal(self) -> BucketWal:
        """The WAL archive in the bucket."""
        from klio_restore.tier2 import BucketWal

        return BucketWal(self.bucket)

    @property
    def wal(self) -> WalArchive | BucketWal:
        """The WAL archive of the tier this context reads."""
        return self.bucket_wal() if self.tier == 2 else self.archive

    def close(self) -> None:
        """Release the bucket's client, if one was started."""
        bucket = self.__dict__.get("bucket")
        if bucket is not None:
            bucket.close()

    @cached_property
    def keyring(self) -> KeyRing:
        """Every configured key (loaded on first use); empty when encryption is off.

        Raises:
            ConfigError: a key file is missing, unreadable or not 32 bytes.
        """
        if self.settings.encryption is None:
            return KeyRing.none()
        return self.settings.encryption.keyring()

    @cached_property
    def codec(self) -> compression.Codec:
        """The configured compression codec (for writers; readers follow each object's header)."""
        comp = self.settings.compression
        return compression.get(comp.algorithm, comp.level)


def open_cluster(
    settings: Settings, name: str | None, *, tier: int | None = None
) -> ClusterContext:
    """Build the read path's context for one cluster.

    Args:
        settings: the loaded configuration.
        name: the ``--cluster`` name, or None when one cluster is configured.
        tier: 1 (the volume) or 2 (the bucket); None: Tier 1 when configured, else Tier 2
            (a configuration with only ``tier2`` is the read-only disaster-recovery mode).

    Returns:
        The context; nothing is read yet.

    Raises:
        ConfigError: the chosen tier is not configured, or no cluster can be picked.
        NotFound: no such cluster.
    """
    cluster = pick_cluster(settings, name)
    if tier is None:
        tier = 2 if settings.tier1 is None and settings.tier2 is not None else 1
    if tier == 1 and settings.tier1 is None:
        raise ConfigError(
            ["tier1.path: not set; the read path needs the Tier-1 directory or the bucket"],
            hint="set tier1.path (or KLIO_TIER1__PATH) to the volume the services write to, or "
            "tier2.s3 to read the bucket",
        )
    if tier == 2 and settings.tier2 is None:
        raise ConfigError(
            ["tier2.s3: not set; --tier 2 reads the bucket"],
            hint="set tier2.s3.bucket (and endpoint_url, region) to the bucket the relay fills",
        )
    archive = None
    if settings.tier1 is not None:
        archive = WalArchive(
            settings.tier1.path,
            cluster.name,
            file_mode=settings.tier1.file_mode,
            dir_mode=settings.tier1.dir_mode,
        )
    return ClusterContext(settings=settings, cluster=cluster, tier1=archive, tier=tier)
