"""What the read path needs for one cluster: its settings, WAL archive, key ring and codec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from klio_common import compression
from klio_common.catalog.wal import WalArchive
from klio_common.crypto import KeyRing
from klio_common.errors import ConfigError, NotFound
from klio_common.runtime.settings import ClusterSettings, Settings


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
    """The read path's view of one cluster.

    Attributes:
        settings: the whole configuration.
        cluster: this cluster's settings.
        archive: its Tier-1 WAL archive.
    """

    settings: Settings
    cluster: ClusterSettings
    archive: WalArchive

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


def open_cluster(settings: Settings, name: str | None) -> ClusterContext:
    """Build the read path's context for one cluster.

    Args:
        settings: the loaded configuration.
        name: the ``--cluster`` name, or None when one cluster is configured.

    Returns:
        The context; nothing is read from disk yet.

    Raises:
        ConfigError: no Tier 1 is configured, or no cluster can be picked.
        NotFound: no such cluster.
    """
    cluster = pick_cluster(settings, name)
    if settings.tier1 is None:
        raise ConfigError(
            ["tier1.path: not set; the read path needs the Tier-1 directory"],
            hint="set tier1.path (or KLIO_TIER1__PATH) to the volume the services write to",
        )
    archive = WalArchive(
        settings.tier1.path,
        cluster.name,
        file_mode=settings.tier1.file_mode,
        dir_mode=settings.tier1.dir_mode,
    )
    return ClusterContext(settings=settings, cluster=cluster, archive=archive)
